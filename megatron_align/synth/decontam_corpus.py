"""`decontam` over a corpus: kept.jsonl, contaminated.jsonl (with the matched items and n-grams) and report.json.

Reads the inputs of the other corpus verbs (:mod:`megatron_align.corpus.sources`: JSONL, compressed JSONL, Parquet,
directories) in chunks; ``workers`` processes match chunks against one :class:`DecontamIndex` (inherited by fork) and
the main process writes results in input order, so the outputs are byte-identical at any worker count. A hit on a
held-out split is never tolerated: the report is written, then the run exits 1 (``EXIT_HELD_OUT``) unless told to
drop and continue.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_align.corpus.job import Job
from megatron_align.corpus.sources import BadLine, expand_inputs, iter_chunks, parse_unit
from megatron_align.errors import UserError
from megatron_align.fileio import atomic_open, atomic_write_json
from megatron_align.synth.decontam import DecontamIndex, Match, SplitItem, load_split_items

EXIT_HELD_OUT = 1
"""Exit status when a document matched an item of a held-out split (after the report is written)."""


@dataclass(frozen=True)
class DecontamConfig:
    ngram: int = 13
    """Words per n-gram (13 for web text; smaller, e.g. 8, for synthetic documents written from the items)."""
    min_words: int = 5
    """A question or option shorter than ``ngram`` words is indexed whole when it has at least this many words."""
    held_out: tuple[str, ...] = ()
    """Splits with zero tolerance: a hit makes the run exit 1 after writing its report."""
    continue_on_held_out: bool = False
    """Drop held-out hits like any other and exit 0."""
    report_only: bool = False
    """Write report.json only (no kept/contaminated JSONL)."""
    text_field: str = "text"
    workers: int = 1
    max_ngrams_per_item: int = 5
    """N-grams listed per matched item, per document and in the report."""


def parse_items_arg(spec: str) -> tuple[str, str | None]:
    """``[SPLIT=]PATH`` -> (path, split or None). A path that exists as given is taken whole (it may hold '=')."""
    if "=" in spec and not os.path.exists(spec):
        split, path = spec.split("=", 1)
        if split and "/" not in split:
            return path, split
    return spec, None


def load_index_items(specs: list[str]) -> list[SplitItem]:
    items: list[SplitItem] = []
    seen: dict[str, str] = {}
    for spec in specs:
        path, split = parse_items_arg(spec)
        for split_item in load_split_items(path, split):
            key = split_item.item.id
            if key in seen:
                raise UserError(f"item id {key!r} appears in {seen[key]} and {split_item.item.where}; "
                                "ids must be unique across --items files")
            seen[key] = split_item.item.where
            items.append(split_item)
    if not items:
        raise UserError("no items to decontaminate against (--items)")
    return items


_INDEX: DecontamIndex | None = None
_CONFIG: DecontamConfig | None = None


def _init_worker(index: DecontamIndex, config: DecontamConfig) -> None:
    global _INDEX, _CONFIG
    _INDEX, _CONFIG = index, config


def _check_chunk(chunk: tuple[int, list[tuple[int, bytes]]]) -> tuple[int, list[tuple]]:
    """(file index, per unit: (number, skip reason or None, raw line, record or None, matches))."""
    assert _INDEX is not None and _CONFIG is not None
    file_index, units = chunk
    out = []
    for number, unit in units:
        try:
            record, text = parse_unit(unit, _CONFIG.text_field)
        except BadLine as bad:
            out.append((number, bad.reason, unit, None, []))
            continue
        if record is None:
            continue
        out.append((number, None, unit, record, _INDEX.find(text, _CONFIG.max_ngrams_per_item)))
    return file_index, out


def _results(paths: list[str], index: DecontamIndex, config: DecontamConfig) -> Iterator[tuple[int, list[tuple]]]:
    """Checked chunks in input order; with several workers at most 2 x workers chunks are in flight."""
    chunks = iter_chunks(paths, config.text_field, max_bytes=1 << 20)
    if config.workers == 1:
        _init_worker(index, config)
        yield from map(_check_chunk, chunks)
        return
    with multiprocessing.get_context("fork").Pool(config.workers, _init_worker, (index, config)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_check_chunk, (chunk,)))
            if len(pending) >= 2 * config.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _match_json(index: DecontamIndex, match: Match) -> dict:
    split_item = index.items[match.item_index]
    return {"item": split_item.item.id, "split": split_item.split, "field": match.field, "ngram": match.ngram}


def build_index(item_specs: list[str], config: DecontamConfig) -> DecontamIndex:
    """The n-gram index of the ``--items`` files; a ``--held-out`` split no item has is refused."""
    index = DecontamIndex(load_index_items(item_specs), config.ngram, config.min_words)
    splits = sorted({si.split for si in index.items})
    unknown = sorted(set(config.held_out) - set(splits))
    if unknown:
        raise UserError(f"--held-out {', '.join(unknown)}: no item of that split in --items (splits: "
                        f"{', '.join(splits)}); a misspelt held-out split would check nothing")
    return index


def _new_stats(index: DecontamIndex, config: DecontamConfig) -> dict:
    splits = sorted({si.split for si in index.items})
    return {"documents": 0, "kept": 0, "contaminated": 0, "held_out_documents": 0, "skipped": {},
            "splits": {s: {"held_out": s in config.held_out, "items": sum(si.split == s for si in index.items),
                           "documents_dropped": 0, "items_matched": {}} for s in splits},
            "passages": {"documents": 0, "items_matched": {}}}


def _add_grams(items_matched: dict, item_id: str, grams, cap: int) -> None:
    """Record ``grams`` of ``item_id``: the first ``cap`` distinct n-grams in corpus order (shards added in input
    order give the same lists as one pass)."""
    listed = items_matched.setdefault(item_id, [])
    for gram in grams:
        if len(listed) >= cap:
            return
        if gram not in listed:
            listed.append(gram)


def _check(paths: list[str], index: DecontamIndex, config: DecontamConfig, stats: dict, kept, bad) -> None:
    """Check every document of ``paths`` into ``stats``; kept lines to ``kept``, contaminated records to ``bad``
    (binary files, or None)."""
    per_split, passages, held_out = stats["splits"], stats["passages"], set(config.held_out)
    for file_index, results in _results(paths, index, config):
        for number, reason, unit, record, matches in results:
            if reason is not None:
                stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
                continue
            stats["documents"] += 1
            dropping = [m for m in matches if m.field != "passage"]
            for m in matches:
                split_item = index.items[m.item_index]
                target = passages if m.field == "passage" else per_split[split_item.split]
                _add_grams(target["items_matched"], split_item.item.id, [m.ngram], config.max_ngrams_per_item)
            passages["documents"] += bool(matches) and not dropping
            if not dropping:
                stats["kept"] += 1
                if kept is not None:
                    kept.write(unit if unit.endswith(b"\n") else unit + b"\n")
                continue
            stats["contaminated"] += 1
            hit_splits = {index.items[m.item_index].split for m in dropping}
            for split in hit_splits:
                per_split[split]["documents_dropped"] += 1
            stats["held_out_documents"] += bool(hit_splits & held_out)
            if bad is not None:
                record["decontam"] = {"source": f"{paths[file_index]}:{number}",
                                      "matches": [_match_json(index, m) for m in matches]}
                bad.write((json.dumps(record, ensure_ascii=False) + "\n").encode())


def _outputs(out_dir: str) -> tuple[str, str]:
    return os.path.join(out_dir, "kept.jsonl"), os.path.join(out_dir, "contaminated.jsonl")


def _write_report(paths: list[str], index: DecontamIndex, config: DecontamConfig, stats: dict, out_dir: str) -> dict:
    for entry in [*stats["splits"].values(), stats["passages"]]:
        entry["num_items_matched"] = len(entry["items_matched"])
    kept_path, bad_path = _outputs(out_dir)
    report = {"inputs": paths, "ngram": config.ngram, "min_words": config.min_words,
              "index": {"items": len(index.items), "ngrams": index.num_ngrams,
                        "fields_too_short": index.unindexed_fields},
              **{k: stats[k] for k in ("documents", "kept", "contaminated", "held_out_documents")},
              "skipped": stats["skipped"], "held_out": list(config.held_out), "splits": stats["splits"],
              "passages": stats["passages"], "report_only": config.report_only,
              "outputs": {} if config.report_only else {"kept": kept_path, "contaminated": bad_path}}
    atomic_write_json(os.path.join(out_dir, "report.json"), report, indent=2)
    return report


def exit_status(report: dict, config: DecontamConfig) -> int:
    """``EXIT_HELD_OUT`` when a document matched a held-out split (and that is not allowed), else 0."""
    return EXIT_HELD_OUT if report["held_out_documents"] > 0 and not config.continue_on_held_out else 0


def run_decontam(inputs: list[str], item_specs: list[str], out_dir: str, config: DecontamConfig) -> tuple[dict, int]:
    """Check every document of ``inputs``; write the outputs under ``out_dir``; return (report, exit status)."""
    paths = expand_inputs(inputs)
    index = build_index(item_specs, config)
    stats = _new_stats(index, config)
    os.makedirs(out_dir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        kept = bad = None
        if not config.report_only:
            kept, bad = (stack.enter_context(atomic_open(path, "wb")) for path in _outputs(out_dir))
        _check(paths, index, config, stats, kept, bad)
    report = _write_report(paths, index, config, stats, out_dir)
    return report, exit_status(report, config)


# ---- as a pipeline job (--executor local|slurm|ray): one shard per input file, merged in input order ----------

_INDEX_CACHE: dict[tuple, DecontamIndex] = {}


def job_index(params: dict) -> DecontamIndex:
    """The index of a :func:`decontam_job`, built once per process (a task checks many files against it; the
    command's own check before the tasks start serves the in-process merge too)."""
    config: DecontamConfig = params["config"]
    key = (tuple(params["items"]), config.ngram, config.min_words)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = build_index(params["items"], config)
    return _INDEX_CACHE[key]


def decontam_job(item_specs: list[str], out_dir: str, config: DecontamConfig) -> Job:
    """``decontam`` as a pipeline job: the same outputs as :func:`run_decontam`, byte for byte."""
    specs = []
    for spec in item_specs:  # absolute paths: a SLURM task may start in another directory
        path, split = parse_items_arg(spec)
        specs.append(f"{split}={os.path.abspath(path)}" if split else os.path.abspath(path))
    params = {"items": specs, "config": dataclasses.replace(config, workers=1), "out_dir": os.path.abspath(out_dir)}
    return Job("decontam", shard_decontam, ".stats.json", merge_decontam, params)


def shard_decontam(path: str, prefix: str, params: dict) -> None:
    config: DecontamConfig = params["config"]
    index = job_index(params)
    stats = _new_stats(index, config)
    with contextlib.ExitStack() as stack:
        kept = bad = None
        if not config.report_only:
            kept, bad = (stack.enter_context(atomic_open(prefix + suffix, "wb"))
                         for suffix in (".kept.jsonl", ".contaminated.jsonl"))
        _check([path], index, config, stats, kept, bad)
    atomic_write_json(prefix + ".stats.json", stats)  # the marker, last


def merge_decontam(files: list[str], shards: list[str], params: dict) -> dict:
    config: DecontamConfig = params["config"]
    index, out_dir = job_index(params), params["out_dir"]
    stats = _new_stats(index, config)
    os.makedirs(out_dir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        outputs = [] if config.report_only else \
            [(stack.enter_context(atomic_open(path, "wb")), suffix)
             for path, suffix in zip(_outputs(out_dir), (".kept.jsonl", ".contaminated.jsonl"))]
        for shard in shards:
            with open(shard + ".stats.json", encoding="utf-8") as f:
                part = json.load(f)
            for key in ("documents", "kept", "contaminated", "held_out_documents"):
                stats[key] += part[key]
            for reason, count in part["skipped"].items():
                stats["skipped"][reason] = stats["skipped"].get(reason, 0) + count
            for split, entry in part["splits"].items():
                stats["splits"][split]["documents_dropped"] += entry["documents_dropped"]
            stats["passages"]["documents"] += part["passages"]["documents"]
            for target, entry in [*((stats["splits"][s], e) for s, e in part["splits"].items()),
                                  (stats["passages"], part["passages"])]:
                for item_id, grams in entry["items_matched"].items():
                    _add_grams(target["items_matched"], item_id, grams, config.max_ngrams_per_item)
            for out, suffix in outputs:
                with open(shard + suffix, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    return _write_report(files, index, config, stats, out_dir)


def summary(report: dict) -> str:
    lines = [f"decontam: {report['documents']:,} documents, {report['contaminated']:,} contaminated, "
             f"{report['kept']:,} kept ({report['ngram']}-grams, {report['index']['items']:,} items, "
             f"{report['index']['ngrams']:,} indexed n-grams)"]
    for split, entry in report["splits"].items():
        mark = " [HELD OUT]" if entry["held_out"] else ""
        lines.append(f"  {split}{mark}: {entry['documents_dropped']:,} documents dropped, "
                     f"{entry['num_items_matched']:,}/{entry['items']:,} items matched")
    if report["passages"]["documents"]:
        lines.append(f"  passages only (reported, kept): {report['passages']['documents']:,} documents, "
                     f"{report['passages']['num_items_matched']:,} items")
    if report["skipped"]:
        lines.append(f"  skipped: {report['skipped']}")
    return "\n".join(lines)
