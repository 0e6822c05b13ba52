"""Hang watchdog: decide from the ranks' heartbeat files that a job stopped making progress.

What: the supervisor feeds every reading of ``<run_dir>/heartbeats/`` into :class:`HangWatchdog`;
it answers with a :class:`HangVerdict` once some rank made no progress for longer than the
timeout of the phase that rank is in:

- ``setup`` (process start, model build, checkpoint load) and the first ``warmup_steps`` steps
  of an attempt: ``initial_timeout_s``;
- inside a step after warm-up: ``max(min_timeout_s, safety_factor x longest step seen)``
  (nvidia-resiliency-ext's calculated timeouts: 5 x the observed maximum after 5 iterations);
- between steps (checkpoint save, eval): ``max(between_steps_timeout_s, safety_factor x longest
  gap seen)``, since heartbeats stop while a checkpoint is written.

Progress is a change of a rank's event counter ``seq``, timed with the supervisor's own clock,
so clocks of other nodes never matter. Every rank runs the same hooks in the same order, so
``seq`` also compares ranks: in a hung job the ranks blocked in a collective are one event ahead
of the rank that hung, which is the rank with the smallest ``seq`` (ties name all of them; the
stack dumps, and which ranks failed to answer SIGUSR2, settle the rest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from megatron_align.config.resilience import SupervisorConfig
from megatron_align.resilience.protocol.heartbeats import PHASE_BETWEEN, PHASE_DONE, PHASE_SETUP, PHASE_STEP


@dataclass
class HangVerdict:
    stalled_rank: int
    """The rank whose silence exceeded its timeout first."""
    stalled_s: float
    timeout_s: float
    phase: str
    suspects: list[int]
    """Ranks with the least progress: the hung rank(s) (the others wait for them in a collective)."""
    beats: dict[int, dict]
    """The last heartbeat of every rank (rank -> heartbeat dict) at detection."""
    stalled_since: float
    """Supervisor time of the stalled rank's last progress."""

    def describe(self) -> str:
        parts = []
        for rank in self.suspects:
            beat = self.beats.get(rank)
            if beat is None:
                parts.append(f"rank {rank} (no heartbeat yet)")
            else:
                parts.append(f"rank {rank} on {beat.get('hostname')} (pid {beat.get('pid')}, local rank "
                             f"{beat.get('local_rank')}) at step {beat.get('step')} section {beat.get('section')}")
        return (f"no progress for {self.stalled_s:.1f} s (timeout {self.timeout_s:.1f} s, phase {self.phase}); "
                f"hung: {'; '.join(parts)}")


class HangWatchdog:
    """Tracks per-rank progress of one job attempt at a time; observed step times persist across attempts."""

    def __init__(self, config: SupervisorConfig, world_size: int) -> None:
        self.config = config
        self.world_size = world_size
        self.max_step_s = 0.0
        self.max_between_s = 0.0
        self.start_attempt(time.time())

    def start_attempt(self, now: float) -> None:
        self.started = now
        self._progress: dict[int, tuple[int | None, int | None, float]] = {}  # rank -> (pid, seq, time of change)
        self._beats: dict[int, dict] = {}

    def step_timeout(self) -> float | None:
        """The derived in-step timeout, or None before any post-warm-up step time was seen."""
        if self.max_step_s <= 0:
            return None
        return max(self.config.min_timeout_s, self.config.safety_factor * self.max_step_s)

    def timeout_for(self, beat: dict | None) -> tuple[float, str]:
        cfg = self.config
        if beat is None or beat.get("phase") == PHASE_SETUP:
            return cfg.initial_timeout_s, PHASE_SETUP
        phase = beat.get("phase")
        step_timeout = self.step_timeout()
        if phase == PHASE_STEP:
            if beat.get("steps_done", 0) >= cfg.warmup_steps and step_timeout is not None:
                return step_timeout, phase
            return cfg.initial_timeout_s, f"{phase} (warm-up)"
        if phase == PHASE_BETWEEN:
            return max(cfg.between_steps_timeout_s, cfg.safety_factor * self.max_between_s), phase
        return float("inf"), str(phase)

    def observe(self, beats: dict[int, dict], now: float | None = None) -> HangVerdict | None:
        """Feed one reading of the heartbeat files; a verdict when some rank exceeded its timeout."""
        now = time.time() if now is None else now
        cfg = self.config
        for rank, beat in beats.items():
            key = (beat.get("pid"), beat.get("seq"))
            old = self._progress.get(rank)
            if old is None or (old[0], old[1]) != key:
                self._progress[rank] = (key[0], key[1], now)
                # Durations measured by the rank itself, after its warm-up steps.
                if beat.get("steps_done", 0) > cfg.warmup_steps:
                    self.max_step_s = max(self.max_step_s, float(beat.get("step_time_s") or 0.0))
                if beat.get("steps_done", 0) > 1:
                    self.max_between_s = max(self.max_between_s, float(beat.get("between_s") or 0.0))
            self._beats[rank] = beat
        worst: tuple[float, int, float, str] | None = None  # (overdue ratio, rank, timeout, phase)
        for rank in range(self.world_size):
            latest = self._beats.get(rank)
            if latest is not None and latest.get("phase") == PHASE_DONE:
                continue
            timeout, phase = self.timeout_for(latest)
            since = self._progress[rank][2] if rank in self._progress else self.started
            ratio = (now - since) / timeout
            if ratio > 1.0 and (worst is None or ratio > worst[0]):
                worst = (ratio, rank, timeout, phase)
        if worst is None:
            return None
        _, rank, timeout, phase = worst
        since = self._progress[rank][2] if rank in self._progress else self.started
        return HangVerdict(rank, now - since, timeout, phase, self.suspects(), dict(self._beats), since)

    def suspects(self) -> list[int]:
        """Ranks with the least progress (no heartbeat at all counts as least)."""
        silent = [r for r in range(self.world_size) if r not in self._beats]
        if silent:
            return silent
        least = min(int(b.get("seq", 0)) for b in self._beats.values())
        return sorted(r for r, b in self._beats.items() if int(b.get("seq", 0)) == least)
