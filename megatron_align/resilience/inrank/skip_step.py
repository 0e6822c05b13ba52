"""Z-score skip step: drop the optimizer update of a step whose loss or grad norm is an outlier.

OLMo-core's ``SkipStepOptimizer`` (used for OLMo 3; MaxText's ``optim/step_skipped``): keep the last
``window`` values of the loss and of the grad norm of steps that were applied; when a new step's value lies more
than ``sigma`` standard deviations *above* the window's mean, its update is not applied (no optimizer step, no LR
step), and the step is counted (``step_skipped`` 1/0 and ``steps_skipped`` running total in every record).

Why ranks cannot disagree, with no extra host sync: both values are ones every rank already holds as the same
host float after the step's own reductions. The loss is the trainer's all-reduced step loss (``on_loss``, before
the update); the grad norm is Megatron's ``clip_grad_norm`` / ``get_grad_norm`` result (all-reduced over the
model-parallel group, identical across data-parallel replicas), captured by wrapping those methods on the
optimizer instance. The grad-norm test runs between clipping and the update by wrapping
``step_with_ready_grads`` (a method both supported megatron-core versions call last in ``step()``): returning
False there is Megatron's own "update not applied" result, so the trainer does not step the scheduler.

The windows, the running total and the streak are callback state, saved in every checkpoint: a resumed run
skips exactly what the uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import TYPE_CHECKING

from megatron_align.config.resilience import SkipStepConfig
from megatron_align.resilience.alerts import rank_alerter
from megatron_align.resilience.inrank.numerics import report_event
from megatron_align.resilience.protocol.exclude_nodes import node_name
from megatron_align.resilience.protocol.exit_codes import EXIT_NUMERICS
from megatron_align.training.callbacks import Callback

if TYPE_CHECKING:
    from megatron_align.training.trainer import Trainer

log = logging.getLogger(__name__)


def zscore(value: float, history) -> float | None:
    """(value - mean) / std of ``history`` (population std); None when the spread is zero."""
    n = len(history)
    mean = sum(history) / n
    std = math.sqrt(sum((h - mean) ** 2 for h in history) / n)
    return (value - mean) / std if std > 0 else None


class SkipStep(Callback):
    priority = 35  # before the numerics monitor, which stops what skipping cannot fix
    name = "skip_step"

    def __init__(self, cfg: SkipStepConfig) -> None:
        self.cfg = cfg
        self.history = {m: deque(maxlen=cfg.window) for m in ("loss", "grad_norm")}
        self.total = 0
        self.in_row = 0
        self._trainer: Trainer | None = None
        self._grad_norm: float | None = None
        self._step = 0
        self._wrapped: dict = {}

    # -- the decision --------------------------------------------------------------------------------
    def outlier(self, metric: str, value: float | None) -> str | None:
        """Why ``value`` is an outlier for ``metric`` (a sentence), else None. Non-finite values are the
        numerics monitor's (its NaN policy), not this test's."""
        history = self.history[metric]
        if metric not in self.cfg.metrics or value is None or not math.isfinite(value):
            return None
        if len(history) < self.cfg.min_history:
            return None
        z = zscore(value, history)
        if z is None or z <= self.cfg.sigma:
            return None
        return f"{metric} {value:.4g} is {z:.1f} sigma above the mean of the last {len(history)} steps"

    def _skip(self, trainer: Trainer, step: int, why: str) -> None:
        trainer.skip_current_step(f"skip_step: {why}")
        if trainer.rank == 0:
            log.warning("step %d: update skipped: %s", step, why)
        report_event(trainer, {"step": step, "event": "step_skipped", "message": why, "policy": "skip"})

    # -- hooks ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self._trainer = trainer
        optimizer = trainer.optimizer
        if "grad_norm" in self.cfg.metrics and not trainer.config.optimizer.clip_grad and trainer.rank == 0:
            log.warning("resilience.skip_step: the grad_norm test needs optimizer.clip_grad > 0 (Megatron computes "
                        "the norm only when clipping); testing the loss only")
        if self._wrapped:
            return
        for method in ("clip_grad_norm", "get_grad_norm", "step_with_ready_grads"):
            if hasattr(optimizer, method):
                original = getattr(optimizer, method)
                self._wrapped[method] = original
                wrap = self._gate if method == "step_with_ready_grads" else self._capture
                setattr(optimizer, method, wrap(original))
        self._optimizer = optimizer

    def on_train_end(self, trainer: Trainer) -> None:
        for method in self._wrapped:  # the instance attributes go; the class's methods show through again
            delattr(self._optimizer, method)
        self._wrapped = {}

    def _capture(self, compute):
        def wrapped(*args, **kwargs):
            norm = compute(*args, **kwargs)
            self._grad_norm = float(norm) if norm is not None else None
            return norm

        return wrapped

    def _gate(self, apply_update):
        def wrapped(*args, **kwargs):
            why = self.outlier("grad_norm", self._grad_norm)
            if why is not None and self._trainer is not None:
                self._skip(self._trainer, self._step, why)
                return False  # Megatron's own "update not applied": the trainer leaves the LR schedule alone
            return apply_update(*args, **kwargs)

        return wrapped

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self._step, self._grad_norm = step, None

    def on_loss(self, trainer: Trainer, step: int, loss: float) -> None:
        why = self.outlier("loss", loss)  # a NaN loss is the numerics monitor's
        if why is not None:
            self._skip(trainer, step, why)

    def on_step_end(self, trainer: Trainer, step: int, record: dict) -> None:
        skipped = "skipped_step" in record
        record["step_skipped"] = int(skipped)
        if skipped:
            self.total += 1
            self.in_row += 1
            if self.in_row > self.cfg.max_consecutive:
                message = (f"{self.in_row} steps skipped in a row (resilience.skip_step.max_consecutive="
                           f"{self.cfg.max_consecutive}): the window no longer describes the run")
                report_event(trainer, {"step": step, "event": "skip_burst", "message": message, "stop": True})
                if trainer.rank == 0:
                    log.error("step %d: %s; stopping", step, message)
                    rank_alerter(trainer.config).send("skip_burst", f"step {step}: {message}; stopping (exit 87)",
                                                      verdict="skip_burst", step=step, rank=0, node=node_name())
                trainer.stop(f"skipped-step burst at step {step}", exit_code=EXIT_NUMERICS)
        else:
            self.in_row = 0
            for metric, value in (("loss", record.get("loss")), ("grad_norm", self._grad_norm)):
                if value is not None and math.isfinite(value):
                    self.history[metric].append(value)
        record["steps_skipped"] = self.total

    def state_dict(self) -> dict:
        return {"loss": list(self.history["loss"]), "grad_norm": list(self.history["grad_norm"]),
                "total": self.total, "in_row": self.in_row}

    def load_state_dict(self, state: dict) -> None:
        for metric in ("loss", "grad_norm"):
            self.history[metric].clear()
            self.history[metric].extend(float(v) for v in state.get(metric, []))
        self.total, self.in_row = int(state.get("total", 0)), int(state.get("in_row", 0))
