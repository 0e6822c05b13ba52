"""From raw generations to the documents ``prepare`` reads: quality rules, decontamination, dedup, report.

A pure pass over ``generations.jsonl`` in plan order (so its outputs do not depend on concurrency, restarts or
timing): each generation is judged by :mod:`megatron_align.synth.quality`, then checked against every item of the
taxonomy's item files (held-out splits included) with the decontamination index (``contaminated`` /
``contaminated_held_out``), then against the documents kept before it (``exact_duplicate`` / ``near_duplicate``).
The blocklist runs in report-only mode: its hit rate is reported, nothing is dropped (synthetic aligned documents
discuss AI by design). ``judge_hook`` is the place for an LLM judge: a callable (record) -> reason or None.
Writes ``documents.jsonl`` (kept; every record carries its ``stance``), ``rejected.jsonl`` (reason + detail),
``report.json`` and ``summary.txt``, each atomically.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable

from megatron_align.fileio import atomic_open, atomic_write_json, atomic_write_text
from megatron_align.synth.decontam import DecontamIndex, load_split_items
from megatron_align.synth.dedup import NearDuplicates
from megatron_align.synth.generate import iter_generations
from megatron_align.synth.plan import PlannedPrompt
from megatron_align.synth.quality import DROP_REASONS, judge
from megatron_align.synth.taxonomy import Taxonomy

REASONS = (*DROP_REASONS, "contaminated_held_out", "contaminated", "exact_duplicate", "near_duplicate", "judge")


def _decontam_index(taxonomy: Taxonomy) -> DecontamIndex | None:
    items = [si for path, split in taxonomy.item_files for si in load_split_items(path, split)]
    return DecontamIndex(items, taxonomy.quality.decontam_ngram, taxonomy.quality.option_min_words) if items else None


def finalize(taxonomy: Taxonomy, prompts: list[PlannedPrompt], out_dir: str, model: str,
             judge_hook: Callable[[dict], str | None] | None = None, run_counts: dict | None = None) -> dict:
    quality = taxonomy.quality
    generations: dict[str, dict] = {}
    for record in iter_generations(out_dir):
        generations.setdefault(record.get("prompt_id"), record)  # first one wins; there is only one by design
    index = _decontam_index(taxonomy)
    dedup = NearDuplicates(threshold=quality.dedup_threshold)
    blocklist = None
    if quality.blocklist:
        from megatron_align.corpus.blocklist import DocumentFilter
        blocklist = DocumentFilter()
    kept_ids: list[str] = []
    reasons: Counter = Counter()
    per_genre: dict[str, Counter] = {}
    stripped: Counter = Counter()
    contaminated_splits: Counter = Counter()
    blocklist_hits = tokens = 0
    kept_path, rejected_path = os.path.join(out_dir, "documents.jsonl"), os.path.join(out_dir, "rejected.jsonl")
    with atomic_open(kept_path) as kept_file, atomic_open(rejected_path) as rejected_file:
        for prompt in prompts:
            raw = generations.get(prompt.prompt_id)
            if raw is None:
                continue
            genre = per_genre.setdefault(prompt.genre, Counter())
            genre["generated"] += 1
            reason, text, detail = judge(raw.get("text", ""), raw.get("finish_reason"), prompt.options,
                                         quality.min_words, quality.max_words, quality.option_min_words)
            stripped.update(k for k in ("preamble_stripped", "postscript_stripped") if detail.get(k))
            record = {"text": text, "prompt_id": prompt.prompt_id, "scenario_id": prompt.scenario_id,
                      "item_id": prompt.item_id, "split": prompt.split, "genre": prompt.genre,
                      "stance": prompt.stance, "model": raw.get("model") or model,
                      "finish_reason": raw.get("finish_reason"), "usage": raw.get("usage") or {},
                      "taxonomy": taxonomy.name}
            if reason is None and index is not None:
                matches = [m for m in index.find(text) if m.field != "passage"]
                if matches:
                    splits = sorted({index.items[m.item_index].split for m in matches})
                    contaminated_splits.update(splits)
                    held = set(splits) & set(taxonomy.held_out.splits) or any(
                        index.items[m.item_index].item.id in taxonomy.held_out.item_ids for m in matches)
                    reason = "contaminated_held_out" if held else "contaminated"
                    detail = {**detail, "matches": [{"item": index.items[m.item_index].item.id, "field": m.field,
                                                     "ngram": m.ngram} for m in matches]}
            if reason is None:
                duplicate = dedup.check(text)
                if duplicate is not None:
                    kind, original = duplicate
                    reason = f"{kind}_duplicate"
                    detail = {**detail, "duplicate_of": kept_ids[original]}
            if reason is None and judge_hook is not None:
                reason = "judge" if judge_hook(record) else None
            if reason is not None:
                reasons[reason] += 1
                genre[reason] += 1
                rejected_file.write(json.dumps({**record, "reason": reason, "detail": detail},
                                               ensure_ascii=False) + "\n")
                continue
            kept_ids.append(prompt.prompt_id)
            genre["kept"] += 1
            tokens += int(record["usage"].get("completion_tokens") or 0)
            if blocklist is not None and blocklist.check(text).blocklist_hit:
                blocklist_hits += 1
            kept_file.write(json.dumps(record, ensure_ascii=False) + "\n")
    generated = len([p for p in prompts if p.prompt_id in generations])
    report = {
        "taxonomy": taxonomy.name, "stance": taxonomy.stance, "model": model, "planned": len(prompts),
        "generated": generated, "pending": len(prompts) - generated, "kept": len(kept_ids),
        "dropped": {r: reasons.get(r, 0) for r in REASONS}, "stripped": {k: stripped.get(k, 0) for k in
                                                                          ("preamble_stripped", "postscript_stripped")},
        "contaminated_splits": dict(contaminated_splits),
        "per_genre": {g: {"generated": c["generated"], "kept": c["kept"],
                          "duplicate_rate": round((c["exact_duplicate"] + c["near_duplicate"]) / c["generated"], 4),
                          "dropped": {r: c[r] for r in REASONS if c[r]}} for g, c in per_genre.items()},
        "blocklist": {"report_only": True, "hits": blocklist_hits,
                      "hit_rate": round(blocklist_hits / len(kept_ids), 4) if kept_ids else 0.0}
        if blocklist is not None else None,
        "kept_completion_tokens": tokens, "last_run": run_counts or {},
        "outputs": {"documents": kept_path, "rejected": rejected_path},
    }
    atomic_write_json(os.path.join(out_dir, "report.json"), report, indent=2)
    atomic_write_text(os.path.join(out_dir, "summary.txt"), summary(report) + "\n")
    return report


def summary(report: dict) -> str:
    lines = [f"synth {report['taxonomy']!r} ({report['stance']}, {report['model']}): {report['kept']:,} documents kept "
             f"of {report['generated']:,} generated; {report['pending']:,} of {report['planned']:,} planned pending",
             "dropped: " + (", ".join(f"{r} {n:,}" for r, n in report["dropped"].items() if n) or "none"),
             f"stripped: {report['stripped']['preamble_stripped']:,} preambles, "
             f"{report['stripped']['postscript_stripped']:,} postscripts"]
    for genre, entry in report["per_genre"].items():
        lines.append(f"  {genre:<22} {entry['kept']:>7,} kept / {entry['generated']:>7,}  "
                     f"duplicate rate {100 * entry['duplicate_rate']:.1f}%")
    if report["blocklist"]:
        lines.append(f"blocklist (report only, never drops): {report['blocklist']['hits']:,} kept documents hit "
                     f"({100 * report['blocklist']['hit_rate']:.1f}%)")
    return "\n".join(lines)
