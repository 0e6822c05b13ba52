"""`megatron-align filter`: run the blocklist over JSONL or Parquet corpora (read by data/sources.py); write kept / flagged JSONL and a report.

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
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import multiprocessing
import os
import random
import sys
import time
from array import array
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

from megatron_align.data import pipeline
from megatron_align.data.filter import DocumentFilter, FilterConfig
from megatron_align.data.sources import BadLine, Progress, expand_inputs, iter_chunks, parse_unit, strict_error
from megatron_align.errors import UserError

_CHUNK_BYTES = 1 << 20
_MAX_LISTED_BAD_LINES = 1000
_SNIPPET_CHARS = 240


def parse_document(raw: bytes, text_field: str) -> tuple[dict[str, Any], str]:
    """(record, text) of one non-blank line, or :class:`BadLine` saying what is wrong with it."""
    record, text = parse_unit(raw, text_field)
    assert record is not None and text is not None, "blank lines are handled by the caller"
    return record, text


def iter_line_chunks(files: list[Path], done_bytes: Optional[list[int]] = None) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """(file index, [(1-based line or row number, raw line without newline), ...]) in ~1 MB chunks of one file each;
    ``done_bytes[0]``: input bytes consumed so far (progress)."""
    for file_index, chunk in iter_chunks([str(f) for f in files], done_bytes=done_bytes, max_bytes=_CHUNK_BYTES):
        yield file_index, [(number, raw.rstrip(b"\r\n")) for number, raw in chunk]


class AtomicOutput:
    """A binary file written under a temporary name next to ``path`` and renamed by :meth:`commit`."""

    def __init__(self, path: Path, compress: bool = False) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._raw = open(self.tmp, "wb")
        # mtime=0 and no file name in the header: the same input gives byte-identical .gz files.
        self.stream: IO[bytes] = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0) if compress else self._raw

    def commit(self) -> None:
        self.stream.close()
        self._raw.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.stream.close()
        self._raw.close()
        self.tmp.unlink(missing_ok=True)


# ---- worker side -------------------------------------------------------------------------------

_WORKER_FILTER: Optional[DocumentFilter] = None


def _init_worker(config: FilterConfig) -> None:
    global _WORKER_FILTER
    _WORKER_FILTER = DocumentFilter(config)


def _classify_chunk(source: str, lines: list[tuple[int, bytes]], doc_filter: Optional[DocumentFilter] = None) -> list[tuple[str, Any]]:
    """Per line: ("blank", None) | (bad reason, detail) | ("kept", verdict json or None) | ("flagged", (verdict json, line, snippet))."""
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
    return {"kept": out_dir / f"kept{suffix}", "flagged": out_dir / f"flagged{suffix}", "report": out_dir / "report.json"}


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
           paths: dict[str, Path], kept_out: AtomicOutput, flagged_out: AtomicOutput, scratch: Optional[AtomicOutput],
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
        _consume(chunks, files, config, stats, kept, flagged, resample, lambda: bar.update(done_bytes[0], stats["documents"]))
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
                stats["terms"].update((c, t) for c, ts in verdict["terms"].items() if c in verdict["categories"] for t in ts)
                stats["flag_positions"].append(stats["kept"])
                flagged.stream.write(line + b"\n")
                if len(stats["examples"]) < config.num_examples:
                    stats["examples"].append({**verdict, "snippet": snippet})
            else:
                if config.strict:
                    raise strict_error(str(files[file_index]), line_no, BadLine(status, payload))
                stats["bad"][status] += 1
                if len(stats["bad_lines"]) < _MAX_LISTED_BAD_LINES:
                    stats["bad_lines"].append({"file": str(files[file_index]), "line": line_no, "reason": status, "detail": payload})


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
        "categories": {tl.category: {"stage": tl.stage, "num_terms": len(tl.terms), "source": tl.source} for tl in doc_filter.term_lists},
        "documents": num_docs,
        "flagged": stats["flagged"],
        "flag_rate": rate(stats["flagged"]),
        "blocklist_hits": stats["blocklist_hits"],
        "classifier_cleared": stats["cleared"],
        "per_category": {
            tl.category: {"flagged": stats["flags_by_category"][tl.category], "flag_rate": rate(stats["flags_by_category"][tl.category]),
                          "blocklist_hits": stats["hits_by_category"][tl.category]}
            for tl in doc_filter.term_lists
        },
        "top_terms": [{"category": c, "term": t, "documents": n} for (c, t), n in
                      sorted(stats["terms"].items(), key=lambda kv: (-kv[1], kv[0]))[:20]],
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


# ---- CLI ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = FilterConfig()
    parser.add_argument("inputs", nargs="+", help="JSONL (.jsonl, .json, .gz, .zst) or Parquet files, or directories of them")
    parser.add_argument("--out-dir", required=True, help="writes kept.jsonl, flagged.jsonl and report.json here")
    parser.add_argument("--text-field", default=defaults.text_field, help="JSON field holding the document text (default: %(default)s)")
    parser.add_argument("--policy", choices=["drop", "resample"], default=defaults.policy,
                        help="drop flagged documents, or resample kept ones in their place to keep the count (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the resampling draw (default: %(default)s)")
    parser.add_argument("--terms-dir", default=None, help="directory of <category>.yaml term lists overlaying the defaults")
    parser.add_argument("--classifier", default=defaults.classifier,
                        help="second stage on blocklist hits: none | term_density | module:callable (default: %(default)s)")
    parser.add_argument("--classifier-threshold", type=float, default=defaults.classifier_threshold,
                        help="hits scoring below this are kept (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"matching processes (default: {defaults.workers}); with --executor: tasks at once (default all)")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad input line (file:line) instead of skipping it")
    parser.add_argument("--compress", action="store_true", help="write kept/flagged as .jsonl.gz")
    pipeline.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = FilterConfig(text_field=args.text_field, policy=args.policy, seed=args.seed, terms_dir=args.terms_dir,
                          classifier=args.classifier, classifier_threshold=args.classifier_threshold,
                          workers=1 if args.executor != "none" else (FilterConfig().workers if args.workers is None else args.workers),
                          strict=args.strict)
    if args.executor != "none":
        params = {"config": config, "out_dir": os.path.abspath(args.out_dir), "compress": args.compress}
        pc = pipeline.config_from_args(args, -1 if args.workers is None else args.workers)
        report = pipeline.run_pipeline("filter", args.inputs, params, pc, args.out_dir.rstrip("/") + ".work")
        if report.get("submitted"):
            pipeline.report_submitted(report)
            return 0
    else:
        report = filter_corpus(args.inputs, args.out_dir, config, compress=args.compress, progress=args.progress)
    print(f"{report['documents']} documents, {report['flagged']} flagged ({100 * report['flag_rate']:.2f}%), "
          f"{report['skipped']['total']} bad lines skipped; {report['output_documents']} written to {report['outputs']['kept']}; "
          f"report: {report['outputs']['report']}", file=sys.stdout)
    return 0
