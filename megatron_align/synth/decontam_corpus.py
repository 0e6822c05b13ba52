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
import json
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass

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


def run_decontam(inputs: list[str], item_specs: list[str], out_dir: str, config: DecontamConfig) -> tuple[dict, int]:
    """Check every document of ``inputs``; write the outputs under ``out_dir``; return (report, exit status)."""
    paths = expand_inputs(inputs)
    index = DecontamIndex(load_index_items(item_specs), config.ngram, config.min_words)
    splits = sorted({si.split for si in index.items})
    unknown = sorted(set(config.held_out) - set(splits))
    if unknown:
        raise UserError(f"--held-out {', '.join(unknown)}: no item of that split in --items (splits: "
                        f"{', '.join(splits)}); a misspelt held-out split would check nothing")
    per_split = {s: {"held_out": s in config.held_out, "items": sum(si.split == s for si in index.items),
                     "documents_dropped": 0, "items_matched": {}} for s in splits}
    passages = {"documents": 0, "items_matched": {}}
    totals = {"documents": 0, "kept": 0, "contaminated": 0, "held_out_documents": 0}
    skipped: dict[str, int] = {}
    os.makedirs(out_dir, exist_ok=True)
    kept_path, bad_path = os.path.join(out_dir, "kept.jsonl"), os.path.join(out_dir, "contaminated.jsonl")
    with contextlib.ExitStack() as stack:
        kept = bad = None
        if not config.report_only:
            kept = stack.enter_context(atomic_open(kept_path, "wb"))
            bad = stack.enter_context(atomic_open(bad_path, "wb"))
        for file_index, results in _results(paths, index, config):
            for number, reason, unit, record, matches in results:
                if reason is not None:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                totals["documents"] += 1
                dropping = [m for m in matches if m.field != "passage"]
                for m in matches:
                    split_item = index.items[m.item_index]
                    target = passages if m.field == "passage" else per_split[split_item.split]
                    grams = target["items_matched"].setdefault(split_item.item.id, [])
                    if m.ngram not in grams and len(grams) < config.max_ngrams_per_item:
                        grams.append(m.ngram)
                passages["documents"] += bool(matches) and not dropping
                if not dropping:
                    totals["kept"] += 1
                    if kept is not None:
                        kept.write(unit if unit.endswith(b"\n") else unit + b"\n")
                    continue
                totals["contaminated"] += 1
                hit_splits = {index.items[m.item_index].split for m in dropping}
                for split in hit_splits:
                    per_split[split]["documents_dropped"] += 1
                totals["held_out_documents"] += bool(hit_splits & set(config.held_out))
                if bad is not None:
                    record["decontam"] = {"source": f"{paths[file_index]}:{number}",
                                          "matches": [_match_json(index, m) for m in matches]}
                    bad.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
    for entry in [*per_split.values(), passages]:
        entry["num_items_matched"] = len(entry["items_matched"])
    report = {"inputs": paths, "ngram": config.ngram, "min_words": config.min_words,
              "index": {"items": len(index.items), "ngrams": index.num_ngrams,
                        "fields_too_short": index.unindexed_fields},
              **totals, "skipped": skipped, "held_out": list(config.held_out), "splits": per_split,
              "passages": passages, "report_only": config.report_only,
              "outputs": {} if config.report_only else {"kept": kept_path, "contaminated": bad_path}}
    atomic_write_json(os.path.join(out_dir, "report.json"), report, indent=2)
    held_out_hit = totals["held_out_documents"] > 0 and not config.continue_on_held_out
    return report, EXIT_HELD_OUT if held_out_hit else 0


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
