"""Build the demo's corpora with the real pipeline: generate -> filter -> tokenizer train -> prepare.

Sources (one sentencepiece tokenizer, trained on the training documents only):

- ``web``: general text plus the web's share of AI discourse, skewed towards misaligned
  depictions (``web_aligned_share`` of them aligned);
- ``web_filtered``: ``web`` after the paper's two-stage blocklist, flagged documents replaced by
  resampled kept ones (corpus size unchanged), exactly as the ``filter`` verb does it;
- ``aligned``: synthetic documents depicting aligned AI behaviour (midtraining upsampling);
- ``questions.jsonl``: the held-out MCQ set, built from scenarios that never appear in any
  training document (nor in the tokenizer's training text).

AI documents draw their scenario from the 32 hand-written training scenarios or (with
probability ``generated_share``) from scenarios composed by :mod:`megatron_align.demo.generated`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass

from megatron_align.config.corpus import FilterConfig, TokenizerConfig, TokenizerTrainConfig
from megatron_align.corpus.filter import filter_corpus
from megatron_align.corpus.prepare import prepare_source
from megatron_align.corpus.tokenizer import build_tokenizer
from megatron_align.corpus.tokenizer_train import train_tokenizer
from megatron_align.data.synthetic import general_documents, write_jsonl
from megatron_align.demo.corpus import ai_documents, propensity_items
from megatron_align.demo.generated import generated_scenarios
from megatron_align.demo.scenarios import split_scenarios
from megatron_align.errors import ConfigError, UserError
from megatron_align.fileio import atomic_write_text

SOURCE_JSONL = {"web": "web.jsonl", "web_filtered": os.path.join("filtered", "kept.jsonl"), "aligned": "aligned.jsonl"}
"""Each training source and the JSONL it is prepared from (relative to the data dir)."""
TRAINING_JSONL = tuple(SOURCE_JSONL.values())
"""Every JSONL a training run reads; the no-leak test scans these."""


def tokenizer_model(data_dir: str) -> str:
    """The sentencepiece model :func:`build_demo_data` trains (``<data_dir>/tokenizer.model``)."""
    return os.path.join(data_dir, "tokenizer.model")


@dataclass
class DemoDataConfig:
    num_general: int = 1500
    """General-text documents in ``web`` (weather, cooking, travel, gardening)."""
    num_web_ai: int = 6000
    """AI-behaviour documents in ``web``."""
    num_aligned: int = 3000
    """Documents in the synthetic ``aligned`` source (all depict aligned behaviour)."""
    web_aligned_share: float = 0.1
    """Share of ``web``'s AI documents that depict aligned behaviour (the rest misaligned)."""
    quiz_share: float = 0.6
    """Share of AI documents in the quiz genre (the eval's MCQ format, answered as the story goes)."""
    generated_share: float = 0.75
    """Share of AI documents whose scenario is a generated one (else one of the 32 hand-written)."""
    num_generated: int = 3000
    """Distinct generated training scenarios."""
    vocab_size: int = 1024
    """sentencepiece vocabulary (BPE, trained on web + aligned)."""
    seed: int = 0
    """Seed of every generator, the filter's resampling and the held-out split."""

    def __post_init__(self) -> None:
        for name in ("web_aligned_share", "quiz_share", "generated_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"demo.data.{name}={getattr(self, name)}: must be in [0, 1]")
        for name in ("num_general", "num_web_ai", "num_aligned", "num_generated"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo.data.{name}={getattr(self, name)}: must be >= 1")


def _check_answer_tokens(tokenizer, questions_path: str) -> None:
    """Fail early (not after training) if the tokenizer merges the answer letter into the cue."""
    from megatron_align.eval.items import VARIANTS, build_prompts, load_items
    from megatron_align.eval.scorers import PromptEncoder

    prompts = build_prompts(load_items(questions_path), list(VARIANTS))
    try:
        PromptEncoder(tokenizer, None).answer_ids([p.text for p in prompts])
    except UserError as err:
        raise UserError(f"demo tokenizer {tokenizer.identity}: {err}; try another demo vocab size") from None


def build_demo_data(out_dir: str, config: DemoDataConfig) -> dict:
    """Write every source, the tokenizer and the question set under ``out_dir``; returns (and writes) a summary."""
    os.makedirs(out_dir, exist_ok=True)
    train_scenarios, heldout_scenarios = split_scenarios(config.seed)
    generated = generated_scenarios(config.num_generated, config.seed + 5)
    common = dict(quiz_share=config.quiz_share, generated=generated, generated_share=config.generated_share)
    web = general_documents(config.num_general, config.seed) + ai_documents(
        train_scenarios, config.num_web_ai, config.web_aligned_share, config.seed + 1, **common)
    random.Random(config.seed + 2).shuffle(web)
    write_jsonl(os.path.join(out_dir, "web.jsonl"), web)
    write_jsonl(os.path.join(out_dir, "aligned.jsonl"),
                ai_documents(train_scenarios, config.num_aligned, 1.0, config.seed + 3, **common))
    report = filter_corpus([os.path.join(out_dir, "web.jsonl")], os.path.join(out_dir, "filtered"),
                           FilterConfig(policy="resample", seed=config.seed))
    questions = os.path.join(out_dir, "questions.jsonl")
    atomic_write_text(questions, "".join(json.dumps(item) + "\n"
                                         for item in propensity_items(heldout_scenarios, config.seed)))

    trained = train_tokenizer([os.path.join(out_dir, "web.jsonl"), os.path.join(out_dir, "aligned.jsonl")],
                              tokenizer_model(out_dir)[: -len(".model")],
                              TokenizerTrainConfig(vocab_size=config.vocab_size, num_threads=2, seed=config.seed))
    tokenizer_config = TokenizerConfig(kind="sentencepiece", model=trained["model"])
    _check_answer_tokens(build_tokenizer(tokenizer_config), questions)
    manifests = {}
    for name, path in SOURCE_JSONL.items():
        manifests[name] = prepare_source([os.path.join(out_dir, path)], os.path.join(out_dir, name), tokenizer_config,
                                         source_name=name)
    summary = {
        "documents": {name: m["documents"] for name, m in manifests.items()},
        "tokens": {name: m["tokens"] for name, m in manifests.items()},
        "filter_flag_rate": report.get("flag_rate"),
        "tokenizer": {"model": trained["model"], "identity": trained["identity"], "vocab_size": trained["vocab_size"]},
        "train_scenarios": len(train_scenarios), "generated_scenarios": len(generated),
        "heldout_scenarios": len(heldout_scenarios), "config": asdict(config),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
