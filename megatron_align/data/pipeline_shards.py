"""What one pipeline task does with one input file, and how the per-file shards become one output.

Each verb (``prepare``, ``filter``, ``tag``) has two functions here:

- ``shard``: process one corpus file into ``WORK/shards/NNNNNNN.*`` with the
  verb's own single-process code (``prepare_source``, the filter's first pass,
  ``tag_into``), writing the shard's marker file last; a shard with its marker
  is finished and is never redone (resume).
- ``merge``: stream the shards, in input-file order, into the outputs the
  single-process verb writes -- the same bytes, because a shard holds exactly
  what the single-process run would have produced for that file and the merge
  only concatenates and adds up. The merge reads each shard once and keeps
  only running totals (plus, for ``filter --policy resample``, the 8 bytes per
  kept document the single-process path keeps too).

:mod:`megatron_align.data.pipeline_steps` runs these as datatrove steps.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from megatron_align.data.sources import SKIP_REASONS

_NUM_EXAMPLES = 10


def _write_json(path: str, payload: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


_FILTERS: dict[str, Any] = {}


def _document_filter(config) -> Any:
    """One DocumentFilter per task process and config (loading the term lists costs more than a small file)."""
    from megatron_align.data.filter import DocumentFilter

    key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    if key not in _FILTERS:
        _FILTERS[key] = DocumentFilter(config)
    return _FILTERS[key]


# ---------------------------------------------------------------- prepare


def shard_prepare(path: str, prefix: str, params: dict) -> None:
    from megatron_align.data.prepare import prepare_source

    prepare_source([path], prefix, params["tokenizer_config"], text_field=params["text_field"], workers=1,
                   strict=params["strict"], source_name="shard", allow_empty=True)


def merge_prepare(files: list[str], shards: list[str], params: dict) -> dict:
    from megatron_align.data.indexed_merge import merge_indexed
    from megatron_align.data.prepare import build_manifest, publish, raise_no_documents
    from megatron_align.data.tokenizer import build_tokenizer

    prefix = params["output_prefix"]
    documents = tokens = blank = 0
    inputs_meta: list[dict] = []
    skipped = {reason: 0 for reason in SKIP_REASONS}
    examples: list[str] = []
    report_tmp = f"{prefix}.skipped.jsonl.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    try:
        with open(report_tmp, "wb") as report:
            for shard in shards:
                m = _read_json(shard + ".manifest.json")
                documents, tokens, blank = documents + m["documents"], tokens + m["tokens"], blank + m["blank_lines"]
                inputs_meta.extend(m["inputs"])
                for reason, n in m["skipped"].items():
                    skipped[reason] += n
                examples.extend(m["skipped_examples"][: _NUM_EXAMPLES - len(examples)])
                with open(shard + ".skipped.jsonl", "rb") as f:
                    shutil.copyfileobj(f, report)
        if documents == 0:
            raise_no_documents(files, skipped, examples)
        config = params["tokenizer_config"]
        manifest = build_manifest(params["source_name"] or os.path.basename(prefix), prefix, documents, tokens,
                                  params["text_field"], config, build_tokenizer(config), inputs_meta, skipped,
                                  examples, blank)

        def commit() -> None:
            merged = merge_indexed(shards, prefix)
            if merged != (documents, tokens):
                raise RuntimeError(f"merged {merged} documents/tokens but the shard manifests say {(documents, tokens)}")

        publish(prefix, manifest, report_tmp, commit)
    finally:
        if os.path.exists(report_tmp):
            os.remove(report_tmp)
    return manifest


# ---------------------------------------------------------------- filter


def shard_filter(path: str, prefix: str, params: dict) -> None:
    from megatron_align.data.filter_corpus import AtomicOutput, _first_pass

    # resampling is global: the merge draws; with policy resample the shard records where each kept line starts
    config = dataclasses.replace(params["config"], workers=1)
    kept, flagged = AtomicOutput(Path(prefix + ".kept.jsonl")), AtomicOutput(Path(prefix + ".flagged.jsonl"))
    try:
        stats = _first_pass([Path(path)], config, _document_filter(config), kept, flagged)
        kept.commit()
        flagged.commit()
    except BaseException:
        kept.discard()
        flagged.discard()
        raise
    if config.policy == "resample":  # int64 offsets, written before the marker
        with open(prefix + ".offsets.tmp", "wb") as f:
            stats["kept_offsets"].tofile(f)
        os.replace(prefix + ".offsets.tmp", prefix + ".offsets")
    stats = {**stats, "terms": [[c, t, n] for (c, t), n in stats["terms"].items()],
             "flag_positions": list(stats["flag_positions"])}
    del stats["kept_offsets"]
    _write_json(prefix + ".stats.json", stats)


def merge_filter(files: list[str], shards: list[str], params: dict) -> dict:
    from megatron_align.data.filter import DocumentFilter
    from megatron_align.data.filter_corpus import _MAX_LISTED_BAD_LINES, AtomicOutput, finish, new_stats, output_paths

    config, compress = params["config"], params["compress"]
    doc_filter = DocumentFilter(config)
    out = Path(params["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out, compress)
    start = time.perf_counter()
    resample = config.policy == "resample"
    kept_out, flagged_out = AtomicOutput(paths["kept"], compress), AtomicOutput(paths["flagged"], compress)
    scratch = AtomicOutput(out / "kept.scratch") if resample else None
    outputs = [o for o in (kept_out, flagged_out, scratch) if o is not None]
    stats = new_stats(0)
    try:
        offset = 0  # bytes in the scratch file so far
        for shard in shards:
            st = _read_json(shard + ".stats.json")
            base = stats["kept"]
            for key in ("documents", "kept", "flagged", "blocklist_hits", "cleared", "blank", "bytes"):
                stats[key] += st[key]
            stats["lines"].extend(st["lines"])
            for key in ("bad", "hits_by_category", "flags_by_category"):
                stats[key].update(st[key])
            stats["terms"].update({(c, t): n for c, t, n in st["terms"]})
            stats["bad_lines"].extend(st["bad_lines"][: _MAX_LISTED_BAD_LINES - len(stats["bad_lines"])])
            stats["examples"].extend(st["examples"][: config.num_examples - len(stats["examples"])])
            stats["flag_positions"].extend(base + p for p in st["flag_positions"])
            with open(shard + ".kept.jsonl", "rb") as f:
                shutil.copyfileobj(f, kept_out.stream if scratch is None else scratch.stream, 1 << 22)
            if scratch is not None:  # the shard's kept-line offsets, shifted to where its lines now start
                stats["kept_offsets"].frombytes((np.fromfile(shard + ".offsets", dtype=np.int64) + offset).tobytes())
                offset += os.path.getsize(shard + ".kept.jsonl")
            with open(shard + ".flagged.jsonl", "rb") as f:
                shutil.copyfileobj(f, flagged_out.stream, 1 << 22)
        return finish([Path(f) for f in files], config, doc_filter, stats, paths, kept_out, flagged_out, scratch,
                      outputs, start)
    except BaseException:
        for o in outputs:
            o.discard()
        raise


# ---------------------------------------------------------------- tag


def shard_tag(path: str, prefix: str, params: dict) -> None:
    from megatron_align.data.filter import FilterConfig
    from megatron_align.data.filter_corpus import AtomicOutput
    from megatron_align.data.tagging import Tagger, tag_into

    config = params["config"]
    doc_filter = (_document_filter(FilterConfig(terms_dir=params["terms_dir"], text_field=config.text_field))
                  if config.source == "filter" else None)
    out = AtomicOutput(Path(prefix + ".tagged.jsonl"))
    try:
        summary = tag_into([path], Tagger(config, doc_filter), out.stream, params["strict"])
        out.commit()
    except BaseException:
        out.discard()
        raise
    _write_json(prefix + ".counts.json", summary)


def merge_tag(files: list[str], shards: list[str], params: dict) -> dict:
    from megatron_align.data.filter_corpus import AtomicOutput
    from megatron_align.data.tagging import MAX_LISTED_BAD_LINES

    out_path = Path(params["output"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = AtomicOutput(out_path, compress=out_path.name.endswith(".gz"))
    totals: dict[str, Any] = {"documents": 0, "aligned": 0, "misaligned": 0, "untagged": 0}
    skipped: collections.Counter = collections.Counter()
    bad_lines: list[dict] = []
    try:
        for shard in shards:
            summary = _read_json(shard + ".counts.json")
            for key in totals:
                totals[key] += summary[key]
            skipped.update(summary["skipped"])
            bad_lines.extend(summary["skipped_lines"][: MAX_LISTED_BAD_LINES - len(bad_lines)])
            with open(shard + ".tagged.jsonl", "rb") as f:
                shutil.copyfileobj(f, writer.stream, 1 << 22)
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    return {**totals, "skipped": dict(skipped), "skipped_lines": bad_lines, "output": str(out_path)}


VERBS = {
    "prepare": (shard_prepare, ".manifest.json", merge_prepare),
    "filter": (shard_filter, ".stats.json", merge_filter),
    "tag": (shard_tag, ".counts.json", merge_tag),
}
"""verb -> (shard function, the shard's marker suffix written last, merge function)."""
