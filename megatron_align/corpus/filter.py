"""The ``filter`` verb: run the blocklist (:mod:`megatron_align.corpus.blocklist`) over JSONL or Parquet corpora
(read by :mod:`megatron_align.corpus.sources`); write kept / flagged JSONL and a report.

Reading and writing stay in the main process; parsing and matching run in
``--workers`` processes on chunks of raw lines, with a bounded number of chunks
in flight so memory does not grow with the corpus. Kept records are written
byte-for-byte as read; flagged records get a ``filter`` field (categories,
terms, classifier score, source file and line).

Replacement policy ``resample`` (the paper's "filtered" condition keeps the
corpus size): each flagged document is replaced, at its own position, by a
retained document drawn uniformly with ``random.Random(seed)`` in corpus order.
Because the draw needs the number of retained documents, kept records first go
to a scratch file whose line offsets are remembered (8 bytes per kept
document); a second pass interleaves them with the replacements.

Every output is written under a temporary name in the output directory and
renamed only when the whole run succeeded; the report is renamed last.

Pipeline (:func:`filter_job`): a shard is one file's first pass (kept, flagged, the counters, and with ``resample``
the kept-line offsets); the merge concatenates them and adds the counters up, then resamples over the whole corpus.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from megatron_align.config.corpus import FilterConfig
from megatron_align.corpus.blocklist import DocumentFilter, cached_document_filter
from megatron_align.corpus.job import Job
from megatron_align.corpus.sources import (
    MAX_LISTED_BAD_LINES,
    BadLine,
    Progress,
    expand_inputs,
    iter_line_chunks,
    parse_document,
    strict_error,
)
from megatron_align.errors import UserError
from megatron_align.fileio import AtomicOutput, atomic_write_json

_SNIPPET_CHARS = 240


# ---- worker side -------------------------------------------------------------------------------

_WORKER_FILTER: DocumentFilter | None = None


def _init_worker(config: FilterConfig) -> None:
    global _WORKER_FILTER
    _WORKER_FILTER = DocumentFilter(config)


def _classify_chunk(
    source: str, lines: list[tuple[int, bytes]], doc_filter: DocumentFilter | None = None
) -> list[tuple[str, Any]]:
    """Per line: ("blank", None) | (bad reason, detail) | ("kept", verdict json or None) |
    ("flagged", (verdict json, line, snippet))."""
    doc_filter = doc_filter or _WORKER_FILTER
    assert doc_filter is not None
    config = doc_filter.config
    out: list[tuple[str, Any]] = []
    for line_no, raw in lines:
        if not raw.strip():
            out.append(("blank", None))
            continue
        try:
            record, text = parse_document(raw, config.text_field)
        except BadLine as bad:
            out.append((bad.reason, str(bad)))  # the detail
            continue
        verdict = doc_filter.check(text)
        if not verdict.flagged:
            out.append(("kept", verdict.to_json() if verdict.blocklist_hit else None))
            continue
        verdict_json = {**verdict.to_json(), "source": {"file": source, "line": line_no}}
        record[config.verdict_field] = verdict_json
        line = json.dumps(record, ensure_ascii=False).encode("utf-8")
        out.append(("flagged", (verdict_json, line, text[:_SNIPPET_CHARS])))
    return out


# ---- main side ---------------------------------------------------------------------------------


def _classified_chunks(files: list[Path], config: FilterConfig, doc_filter: DocumentFilter,
                       done_bytes: list[int]) -> Iterator[tuple[int, list[tuple[int, bytes]], list[tuple[str, Any]]]]:
    """(file index, lines, per-line results) in input order, using ``config.workers`` processes."""
    chunks = iter_line_chunks(files, done_bytes)
    if config.workers == 1:
        for file_index, lines in chunks:
            yield file_index, lines, _classify_chunk(str(files[file_index]), lines, doc_filter)
        return
    with multiprocessing.get_context().Pool(config.workers, initializer=_init_worker, initargs=(config,)) as pool:
        pending: collections.deque = collections.deque()
        for file_index, lines in chunks:
            pending.append((file_index, lines, pool.apply_async(_classify_chunk, (str(files[file_index]), lines))))
            if len(pending) >= 2 * config.workers:  # bounded in-flight work: memory stays flat
                file_index, lines, result = pending.popleft()
                yield file_index, lines, result.get()
        while pending:
            file_index, lines, result = pending.popleft()
            yield file_index, lines, result.get()


def output_paths(out_dir: Path, compress: bool) -> dict[str, Path]:
    suffix = ".jsonl.gz" if compress else ".jsonl"
    return {
        "kept": out_dir / f"kept{suffix}",
        "flagged": out_dir / f"flagged{suffix}",
        "report": out_dir / "report.json",
    }


def filter_corpus(inputs: list[str], out_dir: str, config: FilterConfig, compress: bool = False,
                  progress: bool = False) -> dict[str, Any]:
    """Filter ``inputs`` into ``out_dir`` (kept, flagged, report.json); returns the report (``progress``: on stderr)."""
    files = [Path(p) for p in expand_inputs(inputs)]
    doc_filter = DocumentFilter(config)  # validates the term lists and classifier before any output exists
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out, compress)
    start = time.perf_counter()
    resample = config.policy == "resample"
    kept_out = AtomicOutput(paths["kept"], compress)
    flagged_out = AtomicOutput(paths["flagged"], compress)
    scratch = AtomicOutput(out / "kept.scratch") if resample else None
    outputs = [o for o in (kept_out, flagged_out, scratch) if o is not None]
    try:
        stats = _first_pass(files, config, doc_filter, scratch or kept_out, flagged_out, progress)
        return finish(files, config, doc_filter, stats, paths, kept_out, flagged_out, scratch, outputs, start)
    except BaseException:
        for o in outputs:
            o.discard()
        raise


def finish(files: list[Path], config: FilterConfig, doc_filter: DocumentFilter, stats: dict[str, Any],
           paths: dict[str, Path], kept_out: AtomicOutput, flagged_out: AtomicOutput, scratch: AtomicOutput | None,
           outputs: list[AtomicOutput], start: float) -> dict[str, Any]:
    """After the first pass (here or in a pipeline's merge): resample, write the report, commit, report last."""
    if scratch is not None:
        scratch.stream.close()
        _second_pass(scratch.tmp, stats, config, kept_out)
        scratch.discard()
    report = _report(files, config, doc_filter, stats, paths, time.perf_counter() - start)
    report_out = AtomicOutput(paths["report"])
    outputs.append(report_out)
    report_out.stream.write(json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    for o in (kept_out, flagged_out, report_out):  # everything is complete on disk: rename, report last
        o.commit()
    return report


def new_stats(num_files: int) -> dict[str, Any]:
    return {
        "documents": 0, "kept": 0, "flagged": 0, "blocklist_hits": 0, "cleared": 0, "blank": 0, "bytes": 0,
        "lines": [0] * num_files, "bad": collections.Counter(), "bad_lines": [],
        "hits_by_category": collections.Counter(), "flags_by_category": collections.Counter(),
        "terms": collections.Counter(), "examples": [],
        "kept_offsets": array("q"), "flag_positions": array("q"),  # resample bookkeeping
    }


def _first_pass(files: list[Path], config: FilterConfig, doc_filter: DocumentFilter, kept: AtomicOutput,
                flagged: AtomicOutput, progress: bool = False) -> dict[str, Any]:
    stats = new_stats(len(files))
    resample = config.policy == "resample"
    done_bytes = [0]
    bar = Progress(sum(os.path.getsize(f) for f in files), "filter", enabled=progress)
    chunks = _classified_chunks(files, config, doc_filter, done_bytes)
    try:
        _consume(
            chunks, files, config, stats, kept, flagged, resample, lambda: bar.update(done_bytes[0], stats["documents"])
        )
        bar.close(stats["documents"])
    except BaseException:
        bar.close(stats["documents"], failed=True)
        raise
    finally:
        chunks.close()  # stops the worker pool at once, also when a --strict error is raised
    return stats


def _consume(chunks: Iterator[tuple[int, list[tuple[int, bytes]], list[tuple[str, Any]]]], files: list[Path],
             config: FilterConfig, stats: dict[str, Any], kept: AtomicOutput, flagged: AtomicOutput, resample: bool,
             on_chunk: Callable[[], None]) -> None:
    offset = 0
    for file_index, lines, results in chunks:
        on_chunk()  # progress: shown as each chunk comes back
        for (line_no, raw), (status, payload) in zip(lines, results):
            stats["lines"][file_index] = line_no
            stats["bytes"] += len(raw) + 1
            if status == "blank":
                stats["blank"] += 1
            elif status == "kept":
                stats["documents"] += 1
                stats["kept"] += 1
                if payload is not None:  # a blocklist hit the classifier cleared
                    stats["blocklist_hits"] += 1
                    stats["cleared"] += 1
                    stats["hits_by_category"].update(payload["categories"])
                if resample:
                    stats["kept_offsets"].append(offset)
                    offset += len(raw) + 1
                kept.stream.write(raw + b"\n")
            elif status == "flagged":
                verdict, line, snippet = payload
                stats["documents"] += 1
                stats["flagged"] += 1
                stats["blocklist_hits"] += 1
                stats["hits_by_category"].update(verdict["categories"])
                stats["flags_by_category"].update(verdict["categories"])
                stats["terms"].update(
                    (c, t) for c, ts in verdict["terms"].items() if c in verdict["categories"] for t in ts
                )
                stats["flag_positions"].append(stats["kept"])
                flagged.stream.write(line + b"\n")
                if len(stats["examples"]) < config.num_examples:
                    stats["examples"].append({**verdict, "snippet": snippet})
            else:
                if config.strict:
                    raise strict_error(str(files[file_index]), line_no, BadLine(status, payload))
                stats["bad"][status] += 1
                if len(stats["bad_lines"]) < MAX_LISTED_BAD_LINES:
                    stats["bad_lines"].append(
                        {"file": str(files[file_index]), "line": line_no, "reason": status, "detail": payload}
                    )


def _second_pass(scratch_path: Path, stats: dict[str, Any], config: FilterConfig, kept: AtomicOutput) -> None:
    """Write the kept records again, with a seeded resample of a kept record at each flagged position."""
    offsets, positions = stats["kept_offsets"], stats["flag_positions"]
    num_kept = len(offsets)
    if positions and num_kept == 0:
        raise UserError("every document was flagged, so policy 'resample' has nothing to resample from; "
                        "use --policy drop or check the term lists")
    rng = random.Random(config.seed)
    draws = [rng.randrange(num_kept) for _ in positions]
    with open(scratch_path, "rb") as seq, open(scratch_path, "rb") as rand:
        next_flag = 0
        for kept_index in range(num_kept + 1):
            while next_flag < len(positions) and positions[next_flag] == kept_index:
                rand.seek(offsets[draws[next_flag]])
                kept.stream.write(rand.readline())
                next_flag += 1
            if kept_index < num_kept:
                kept.stream.write(seq.readline())
    stats["replaced"] = len(positions)


def _report(files: list[Path], config: FilterConfig, doc_filter: DocumentFilter, stats: dict[str, Any],
            paths: dict[str, Path], seconds: float) -> dict[str, Any]:
    num_docs = stats["documents"]

    def rate(n: int) -> float:
        return round(n / num_docs, 6) if num_docs else 0.0

    replaced = stats.get("replaced", 0)
    return {
        "inputs": [{"path": str(f), "lines": n} for f, n in zip(files, stats["lines"])],
        "config": dataclasses.asdict(config),
        "terms_fingerprint": doc_filter.fingerprint,
        "categories": {
            tl.category: {"stage": tl.stage, "num_terms": len(tl.terms), "source": tl.source}
            for tl in doc_filter.term_lists
        },
        "documents": num_docs,
        "flagged": stats["flagged"],
        "flag_rate": rate(stats["flagged"]),
        "blocklist_hits": stats["blocklist_hits"],
        "classifier_cleared": stats["cleared"],
        "per_category": {
            tl.category: {
                "flagged": stats["flags_by_category"][tl.category],
                "flag_rate": rate(stats["flags_by_category"][tl.category]),
                "blocklist_hits": stats["hits_by_category"][tl.category],
            }
            for tl in doc_filter.term_lists
        },
        "top_terms": [
            {"category": c, "term": t, "documents": n}
            for (c, t), n in sorted(stats["terms"].items(), key=lambda kv: (-kv[1], kv[0]))[:20]
        ],
        "examples": stats["examples"],
        "policy": config.policy,
        "kept_documents": stats["kept"],
        "replaced": replaced,
        "output_documents": stats["kept"] + replaced,
        "skipped": {
            "total": sum(stats["bad"].values()),
            "by_reason": dict(sorted(stats["bad"].items())),
            "lines": stats["bad_lines"],
            "lines_truncated": sum(stats["bad"].values()) > len(stats["bad_lines"]),
        },
        "blank_lines": stats["blank"],
        "input_bytes": stats["bytes"],
        "seconds": round(seconds, 3),
        "mb_per_s": round(stats["bytes"] / 1e6 / max(seconds, 1e-9), 3),
        "outputs": {k: str(v) for k, v in paths.items()},
    }


# ---- pipeline (megatron_align.corpus.pipeline) ------------------------------------------------


def filter_job(config: FilterConfig, out_dir: str, compress: bool = False) -> Job:
    """``filter`` as a pipeline job: the same outputs as :func:`filter_corpus` (the config's workers: 1 per task)."""
    params = {"config": dataclasses.replace(config, workers=1), "out_dir": os.path.abspath(out_dir),
              "compress": compress}
    return Job("filter", shard_filter, ".stats.json", merge_filter, params)


def shard_filter(path: str, prefix: str, params: dict) -> None:
    # resampling is global: the merge draws; with policy resample the shard records where each kept line starts
    config = params["config"]
    kept, flagged = AtomicOutput(prefix + ".kept.jsonl"), AtomicOutput(prefix + ".flagged.jsonl")
    try:
        stats = _first_pass([Path(path)], config, cached_document_filter(config), kept, flagged)
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
    atomic_write_json(prefix + ".stats.json", stats)


def _add_shard_stats(stats: dict[str, Any], shard: dict[str, Any], num_examples: int) -> None:
    """One shard's counters added to the running totals, key by key as :func:`new_stats` lays them out (a new
    counter there is merged here without an edit)."""
    base = stats["kept"]  # kept documents before this shard: where its flag positions start
    for key, total in stats.items():
        if key == "kept_offsets":  # from the shard's .offsets file
            continue
        value = shard[key]
        if key == "terms":  # (category, term) keys travel as [category, term, count] in JSON
            total.update({(c, t): n for c, t, n in value})
        elif key == "flag_positions":
            total.extend(base + p for p in value)
        elif isinstance(total, int):
            stats[key] += value
        elif isinstance(total, collections.Counter):
            total.update(value)
        elif key == "lines":  # one entry per input file
            total.extend(value)
        else:  # lists quoted in the report, capped
            total.extend(value[: (num_examples if key == "examples" else MAX_LISTED_BAD_LINES) - len(total)])


def merge_filter(files: list[str], shards: list[str], params: dict) -> dict:
    config, compress = params["config"], params["compress"]
    doc_filter = DocumentFilter(config)
    out = Path(params["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out, compress)
    start = time.perf_counter()
    kept_out, flagged_out = AtomicOutput(paths["kept"], compress), AtomicOutput(paths["flagged"], compress)
    scratch = AtomicOutput(out / "kept.scratch") if config.policy == "resample" else None
    outputs = [o for o in (kept_out, flagged_out, scratch) if o is not None]
    stats = new_stats(0)
    try:
        offset = 0  # bytes in the scratch file so far
        for shard in shards:
            _add_shard_stats(stats, json.loads(Path(shard + ".stats.json").read_text(encoding="utf-8")),
                             config.num_examples)
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
