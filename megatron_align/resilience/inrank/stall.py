"""Rank 0's stall alert: a webhook alert when no training step has ended for ``resilience.alerts.stall_after_s``.

It fires before the supervisor's hang verdict (or where no supervisor runs) so a person hears of a stuck job;
the watching is a daemon thread (:class:`megatron_align.resilience.alerts.StallWatch`), the loop only stamps
the time of each step end. Only when ``$MEGATRON_ALIGN_ALERT_WEBHOOK`` is set.
"""

from __future__ import annotations

from megatron_align.resilience.alerts import StallWatch, rank_alerter
from megatron_align.training.callbacks import Callback


class StallAlert(Callback):
    priority = -80  # after the heartbeat: it only watches the time since the last step
    name = "stall_alert"

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self.watch: StallWatch | None = None

    def on_train_start(self, trainer) -> None:
        if trainer.rank == 0:
            self.watch = StallWatch(rank_alerter(trainer.config), self.stall_after_s)
            self.watch.progress(trainer.step)

    def on_step_end(self, trainer, step: int, record: dict) -> None:
        if self.watch is not None:
            self.watch.progress(step)

    def on_train_end(self, trainer) -> None:
        if self.watch is not None:
            self.watch.close()

    def on_error(self, trainer, error: BaseException) -> None:
        self.on_train_end(trainer)
