"""Numerics: NaN/Inf, loss spikes, and a loss curve that bends away from its power law.

Three failure shapes, three monitors, all fed by numbers every rank already has:

- **NaN/Inf loss** (``on_loss``: after forward/backward, *before* the update; the loss is the
  all-reduced one, identical on every rank, so every rank decides the same). Policy ``skip``
  drops the step's update (``trainer.skip_current_step``), ``stop`` also checkpoints the
  unharmed weights and exits 87 (restart from the newest checkpoint), ``log`` only records.
  More than ``max_consecutive_skips`` skips in a row stop the run: the weights have diverged.
- **Loss spike**: loss > ``spike_factor`` x the max of the last ``spike_window`` losses
  (Megatron-Core's rerun state machine uses 10x the recent max). Same policies.
- **Non-finite grad norm** (``on_step_end``): Megatron has already applied that update, so the
  in-memory weights are suspect and must not be checkpointed. Unless the policy is ``log``,
  every rank writes nothing more and exits 87 at once (``NumericsAbort``); the supervisor
  restarts from the last good checkpoint.

**Loss trajectory.** Pretraining loss follows a power law in steps, L(t) = a t^-b + c, closely
enough that a run "curving off" -- flattening early, creeping up -- is how silent bugs
(bad data mix, broken kernel, corrupted optimizer state) show long before anything NaNs. The
monitor smooths the loss (bias-corrected EMA), and every ``interval`` steps after warm-up
compares the smoothed loss with the prediction of a power law fitted to the earlier in-band
points. The fit is closed-form least squares in (a, c) for each b on a log grid, refined by a
golden-section search on log b: robust, no initial guess, a few ms. A deviation above the band
(the larger of ``band`` and 3x the fit's relative residual) for ``patience`` consecutive checks
flags the run; deviating points are kept out of the fit so a sustained bend stays visible. Only
*worse than predicted* counts: LR decay legitimately bends the curve down. A change of data
phase (the ``phase`` key of mixture runs) restarts the fit.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from megatron_align.config.resilience import NumericsConfig, TrajectoryConfig
from megatron_align.resilience.protocol.exit_codes import EXIT_NUMERICS
from megatron_align.resilience.protocol.run_files import NUMERICS_FILE, append_record
from megatron_align.training.callbacks import Callback, TrainerView

log = logging.getLogger(__name__)


class NumericsAbort(SystemExit):
    """Exit 87 *without* the final checkpoint (the weights already took a non-finite update)."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_NUMERICS)
        self.message = message


def report_event(trainer: TrainerView, record: dict) -> None:
    if trainer.rank == 0:
        append_record(trainer.run_dir, NUMERICS_FILE, record)


class NumericsMonitor(Callback):
    name = "numerics"
    priority = 40  # last detector: its ``on_step_end`` may end the process (exit 87) after writing the record

    def __init__(self, cfg: NumericsConfig) -> None:
        self.cfg = cfg
        self._recent: deque = deque(maxlen=cfg.spike_window)
        self._skips_in_row = 0
        self._event: tuple[str, str] | None = None

    def on_loss(self, trainer: TrainerView, step: int, loss: float) -> None:
        cfg = self.cfg
        self._event = None
        if not math.isfinite(loss):
            self._handle(trainer, step, "nan_loss", f"loss is {loss}", cfg.nan_policy)
            return
        if cfg.spike_factor and self._recent and loss > cfg.spike_factor * max(self._recent):
            self._handle(
                trainer,
                step,
                "loss_spike",
                f"loss {loss:.4g} > {cfg.spike_factor:g} x recent max {max(self._recent):.4g}",
                cfg.spike_policy,
            )
            if cfg.spike_policy != "log":
                return
        self._recent.append(loss)
        self._skips_in_row = 0

    def _handle(self, trainer: TrainerView, step: int, kind: str, message: str, policy: str) -> None:
        self._event = (kind, message)
        stop = policy == "stop"
        if policy in ("skip", "stop"):
            trainer.skip_current_step(f"{kind}: {message}")
            self._skips_in_row += 1
            if self._skips_in_row > self.cfg.max_consecutive_skips:
                stop, message = True, f"{message}; {self._skips_in_row} steps skipped in a row"
        if trainer.rank == 0:
            log.warning("numerics at step %d: %s (policy %s%s)", step, message, policy, ", stopping" if stop else "")
        report_event(trainer, {"step": step, "event": kind, "message": message, "policy": policy, "stop": stop})
        if stop:
            trainer.stop(f"{kind} at step {step}", exit_code=EXIT_NUMERICS)

    def on_step_end(self, trainer: TrainerView, step: int, record: dict) -> None:
        if self._event is not None:
            record["numerics/event"] = self._event[0]
        grad_norm = record.get("grad_norm")
        if "skipped_step" in record or grad_norm is None or math.isfinite(grad_norm):
            return
        message = f"grad norm is {grad_norm} (the update was applied)"
        record["numerics/event"] = "nan_grad_norm"
        stop = self.cfg.nan_policy != "log"
        report_event(
            trainer,
            {"step": step, "event": "nan_grad_norm", "message": message, "policy": self.cfg.nan_policy, "stop": stop},
        )
        if not stop:
            if trainer.rank == 0:
                log.warning("numerics at step %d: %s", step, message)
            return
        if trainer.rank == 0:
            log.error("numerics at step %d: %s; exiting %d without a checkpoint", step, message, EXIT_NUMERICS)
        trainer.metrics.write(record)  # the trainer will not get to write this step's record
        raise NumericsAbort(message)

    def state_dict(self) -> dict:
        return {"recent": list(self._recent), "skips_in_row": self._skips_in_row}

    def load_state_dict(self, state: dict) -> None:
        self._recent.extend(state.get("recent", []))
        self._skips_in_row = int(state.get("skips_in_row", 0))


# -- loss trajectory -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float
    c: float
    rel_residual: float
    """RMS of (observed / fitted - 1) over the fit points."""

    def __call__(self, t) -> np.ndarray | float:
        return self.a * np.power(t, -self.b) + self.c


def _fit_at(t: np.ndarray, y: np.ndarray, b: float) -> tuple[float, float, float]:
    """Least squares of y = a x + c with x = t^-b (closed form); returns (sse, a, c)."""
    x = np.power(t, -b)
    xc = x - x.mean()
    var = float(xc @ xc)
    a = float(xc @ (y - y.mean())) / var if var > 0 else 0.0
    if a < 0:  # the loss must not rise along the fitted law: fall back to a flat line
        a = 0.0
    c = float(y.mean() - a * x.mean())
    residual = a * x + c - y
    return float(residual @ residual), a, c


def fit_power_law(steps, losses) -> PowerLaw:
    """Least-squares fit of L(t) = a t^-b + c (a >= 0): grid over log b, golden-section refinement."""
    t, y = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if t.size < 3 or np.any(t <= 0):
        raise ValueError("need >= 3 points at positive steps")
    grid = np.geomspace(0.01, 4.0, 60)
    sse = [_fit_at(t, y, b)[0] for b in grid]
    i = int(np.argmin(sse))
    lo, hi = math.log(grid[max(0, i - 1)]), math.log(grid[min(len(grid) - 1, i + 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _fit_at(t, y, math.exp(m1))[0] <= _fit_at(t, y, math.exp(m2))[0]:
            hi = m2
        else:
            lo = m1
    b = math.exp((lo + hi) / 2)
    _, a, c = _fit_at(t, y, b)
    fitted = a * np.power(t, -b) + c
    return PowerLaw(a, b, c, float(np.sqrt(np.mean((y / fitted - 1.0) ** 2))))


class TrajectoryMonitor(Callback):
    name = "loss_trajectory"
    priority = 30  # after health, before the numerics monitor
    _MAX_POINTS = 1000

    def __init__(self, cfg: TrajectoryConfig) -> None:
        self.cfg = cfg
        self._reset(start=0, phase=None)

    def _reset(self, start: int, phase) -> None:
        self.points: list[tuple[int, float]] = []  # in-band (step, smoothed loss): the fit set
        self._ema_raw, self._ema_n, self._streak, self._start, self._phase = 0.0, 0, 0, start, phase

    def smoothed(self) -> float:
        return self._ema_raw / (1.0 - self.cfg.smoothing ** self._ema_n)

    def observe(self, step: int, loss: float, phase=None) -> dict:
        """Feed one step's loss; returns the trajectory keys for the metrics record (on check steps)."""
        if phase != self._phase:
            self._reset(start=step - 1, phase=phase)
        s = self.cfg.smoothing
        self._ema_raw, self._ema_n = s * self._ema_raw + (1 - s) * loss, self._ema_n + 1
        if step - self._start <= self.cfg.warmup_steps or step % self.cfg.interval:
            return {}
        return self._check(step, self.smoothed())

    def _check(self, step: int, smoothed: float) -> dict:
        cfg = self.cfg
        if len(self.points) < cfg.min_points:
            self.points.append((step, smoothed))
            return {}
        law = fit_power_law(*zip(*self.points))
        predicted = float(law(step))
        deviation = smoothed / predicted - 1.0 if predicted > 0 else 0.0
        band = max(cfg.band, 3.0 * law.rel_residual)
        out = {"trajectory/deviation": deviation, "trajectory/predicted_loss": predicted, "trajectory/band": band}
        if deviation > band:
            self._streak += 1
        else:
            self._streak = 0
            self.points.append((step, smoothed))
            if len(self.points) > self._MAX_POINTS:
                self.points = self.points[::2]
        if self._streak >= cfg.patience:
            out["trajectory/flagged"] = 1
            out["trajectory/exponent"] = law.b
        return out

    def on_step_end(self, trainer: TrainerView, step: int, record: dict) -> None:
        loss = record.get("loss")
        if "skipped_step" in record or loss is None or not math.isfinite(loss):
            return
        keys = self.observe(step, loss, record.get("phase"))
        record.update(keys)
        if keys.get("trajectory/flagged") and self._streak == self.cfg.patience:
            message = (
                f"smoothed loss {keys['trajectory/deviation']:+.1%} vs the power-law fit for {self._streak} checks "
                f"(band {keys['trajectory/band']:.1%}, predicted {keys['trajectory/predicted_loss']:.4f})"
            )
            if trainer.rank == 0:
                log.warning("loss trajectory at step %d: %s", step, message)
            report_event(
                trainer, {"step": step, "event": "trajectory_deviation", "message": message, "policy": self.cfg.policy}
            )
            if self.cfg.policy == "stop":
                trainer.stop(f"loss trajectory deviation at step {step}", exit_code=EXIT_NUMERICS)

    def state_dict(self) -> dict:
        return {"points": [list(p) for p in self.points], "ema_raw": self._ema_raw, "ema_n": self._ema_n,
                "streak": self._streak, "start": self._start, "phase": self._phase}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.points = [(int(s), float(v)) for s, v in state["points"]]
            self._ema_raw, self._ema_n, self._streak = state["ema_raw"], state["ema_n"], state["streak"]
            self._start, self._phase = state["start"], state["phase"]
