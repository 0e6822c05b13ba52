"""Periodic propensity eval inside training: every ``eval.interval`` steps (and after the last).

It scores ``trainer.model`` itself -- no checkpoint round-trip -- with the same
:class:`~megatron_align.eval.megatron_scorer.MegatronScorer` the CLI uses, so the numbers in
metrics.jsonl equal what ``megatron-align eval propensity`` reports for the checkpoint of that
step. Runs on every rank (it is a collective); the model goes to eval mode under ``no_grad`` and
back to train mode. The step's metrics record gets ``propensity/misalignment_rate``,
``propensity/p_misaligned``, ``propensity/p_first`` (+ ``_sem``),
``propensity/debiased_misalignment_rate`` and ``propensity/eval_s``; rank 0 writes the full
report to ``<eval.out_dir or run_dir/eval>/propensity_step<step>.json``.
"""

from __future__ import annotations

import logging
import os
import time

from megatron_align.config import EvalConfig, RootConfig
from megatron_align.errors import ConfigError
from megatron_align.eval.items import load_items
from megatron_align.eval.propensity import evaluate
from megatron_align.eval.report import metrics_for_record, write_report
from megatron_align.training.callbacks import Callback

log = logging.getLogger(__name__)

REPORT_PREFIX = "propensity_step"


def report_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"{REPORT_PREFIX}{step:07d}.json")


class PropensityCallback(Callback):
    name = "eval.propensity"
    priority = 60  # after the detectors, before tracking logs the record

    def __init__(self, config: EvalConfig, total_steps: int, seq_length: int, run_dir: str) -> None:
        self.config = config
        self.total_steps = total_steps
        self.seq_length = seq_length
        self.out_dir = config.out_dir or os.path.join(run_dir, "eval")
        self.items = load_items(config.propensity_questions, config.max_items)  # schema errors before step 1
        self.scorer = None

    def on_train_start(self, trainer) -> None:
        from megatron_align.eval.megatron_scorer import MegatronScorer

        self.scorer = MegatronScorer(trainer.model, trainer.data.tokenizer, trainer.vocab_size, self.config.batch_size,
                                     self.config.max_prompt_tokens or self.seq_length)

    def due(self, step: int) -> bool:
        return step % self.config.interval == 0 or step == self.total_steps

    def on_step_end(self, trainer, step: int, record: dict) -> None:
        if not self.due(step):
            return
        started = time.time()
        self.scorer.description = f"{trainer.run_dir} step {step} (in training)"
        report = evaluate(self.scorer, self.items, self.config.variants, self.config.both_orders,
                          meta={"step": step, "questions": self.config.propensity_questions})
        record.update(metrics_for_record(report))
        record["propensity/eval_s"] = time.time() - started
        if trainer.rank == 0:
            write_report(report, report_path(self.out_dir, step))
            log.info("step %d | propensity: misalignment rate %.3f | P(misaligned) %.3f | P(first) %.3f | %.1f s", step,
                     report["summary"]["misalignment_rate"]["mean"], report["summary"]["p_misaligned"]["mean"],
                     report["summary"]["p_first"]["mean"], record["propensity/eval_s"])


def build_callbacks(config: RootConfig) -> list[Callback]:
    """Trainer callbacks for this area, from the root config (empty when disabled)."""
    cfg = config.eval
    if not cfg.enabled:
        return []
    if config.parallel.context > 1:
        raise ConfigError("eval.interval > 0 with parallel.context > 1: the in-training propensity eval does not "
                          "support context parallelism; evaluate checkpoints with `megatron-align eval propensity`")
    if cfg.interval % config.logging.interval:
        raise ConfigError(
            f"eval.interval={cfg.interval} must be a multiple of logging.interval={config.logging.interval}, "
            "otherwise the eval results miss metrics.jsonl"
        )
    return [PropensityCallback(cfg, config.train.steps, config.model.seq_length, config.run_dir)]
