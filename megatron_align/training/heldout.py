"""Held-out loss per source: every ``data.heldout_interval`` steps, forward-only over a fixed set.

Each source's documents are split by Megatron-Core's GPTDataset split
(``data.heldout_percent``); the same first ``data.heldout_samples`` held-out
sequences are evaluated every time, so the curve compares like with like.
Logged as ``heldout_loss/<source>`` in metrics.jsonl.
"""

from __future__ import annotations

from megatron_align.config import RootConfig
from megatron_align.training.callbacks import Callback


class HeldoutLossCallback(Callback):
    name = "heldout_loss"
    priority = 50  # after the detectors, before tracking logs the record

    def __init__(self, interval: int, num_samples: int) -> None:
        self.interval = interval
        self.num_samples = num_samples

    def on_step_end(self, trainer, step: int, record: dict) -> None:
        if step % self.interval:
            return
        t = trainer.config.train
        per_step = t.micro_batch_size * trainer.layout.data
        num_samples = max(per_step, (self.num_samples or t.global_batch_size) // per_step * per_step)
        for index, source in enumerate(trainer.config.data.sources):
            loss = trainer.evaluate_loss(
                lambda index=index: trainer.data.heldout_microbatches(index, num_samples), num_samples // per_step
            )
            record[f"heldout_loss/{source.name}"] = loss


def build_callbacks(config: RootConfig) -> list[Callback]:
    if config.data.heldout_interval and not config.data.mock:
        return [HeldoutLossCallback(config.data.heldout_interval, config.data.heldout_samples)]
    return []
