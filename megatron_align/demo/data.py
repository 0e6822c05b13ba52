"""Build the demo's corpora with the real pipeline: generate -> filter (blocklist) -> prepare (.bin/.idx).

Sources (all byte-tokenized):
- ``web``: general text plus the web's share of AI discourse (mostly misaligned depictions);
- ``web_filtered``: ``web`` after the paper's two-stage blocklist, flagged documents replaced by
  resampled kept ones (corpus size unchanged), exactly as the ``filter`` verb does it;
- ``aligned``: synthetic documents depicting aligned AI behaviour (midtraining upsampling);
- ``questions.jsonl``: the held-out MCQ set (scenarios that never appear in any training document).
"""

from __future__ import annotations

import json
import os
import random

from megatron_align.data.filter import FilterConfig
from megatron_align.data.filter_corpus import filter_corpus
from megatron_align.data.prepare import prepare_source
from megatron_align.data.synthetic import general_documents, write_jsonl
from megatron_align.data.tokenizer import TokenizerConfig
from megatron_align.demo.corpus import ai_documents, propensity_items
from megatron_align.demo.scenarios import split_scenarios


def build_demo_data(out_dir: str, num_general: int, num_web_ai: int, num_aligned: int,
                    web_aligned_share: float = 0.25, seed: int = 0) -> dict:
    """Write every source and the question set under ``out_dir``; returns a summary (also in summary.json)."""
    os.makedirs(out_dir, exist_ok=True)
    train_scenarios, heldout_scenarios = split_scenarios(seed)
    web = general_documents(num_general, seed) + ai_documents(train_scenarios, num_web_ai, web_aligned_share, seed + 1)
    random.Random(seed + 2).shuffle(web)
    write_jsonl(os.path.join(out_dir, "web.jsonl"), web)
    write_jsonl(os.path.join(out_dir, "aligned.jsonl"), ai_documents(train_scenarios, num_aligned, 1.0, seed + 3))
    report = filter_corpus([os.path.join(out_dir, "web.jsonl")], os.path.join(out_dir, "filtered"),
                           FilterConfig(policy="resample", seed=seed))
    tokenizer = TokenizerConfig(kind="byte")
    manifests = {}
    for name, path in (("web", "web.jsonl"), ("web_filtered", os.path.join("filtered", "kept.jsonl")),
                       ("aligned", "aligned.jsonl")):
        manifests[name] = prepare_source([os.path.join(out_dir, path)], os.path.join(out_dir, name), tokenizer,
                                         source_name=name)
    with open(os.path.join(out_dir, "questions.jsonl"), "w") as f:
        for item in propensity_items(heldout_scenarios, seed):
            f.write(json.dumps(item) + "\n")
    summary = {
        "documents": {name: m["documents"] for name, m in manifests.items()},
        "tokens": {name: m["tokens"] for name, m in manifests.items()},
        "filter_flag_rate": report.get("flag_rate"),
        "train_scenarios": len(train_scenarios), "heldout_scenarios": len(heldout_scenarios),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
