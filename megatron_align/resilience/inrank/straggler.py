"""Straggler detector: which rank makes everyone wait, scored per section of the step.

What: every rank times the named sections of each step (``data``, ``forward_backward``,
``optimizer``, ``checkpoint`` from the trainer's ``on_section``, plus ``forward_compute``: the
model forward itself, timed by hooks on the model chunks). Every ``interval`` steps each rank
takes the median of its recent samples per section and one ``all_gather`` of a few floats
gives every rank everybody's medians. Two scores per (rank, section), both 1.0 when healthy:

- **relative** = best peer median / this rank's median. Peers are the ranks of the same
  pipeline stage (they run the same layers; stages differ in work by design).
- **individual** = this rank's best median over its recent ``history`` / its current median:
  a GPU that got slower than it used to be (thermal throttling, a degrading link).

A score below its threshold (default 0.75, as in nvidia-resiliency-ext) flags the rank. The
one idea that keeps the verdicts honest: *collectives equalise wall time*. A slow rank arrives
late at the gradient all-reduce, the fast ones wait inside it, and ``forward_backward`` takes
the same wall time everywhere. So relative scores are meaningful for sections without a
data-parallel collective inside (``forward_compute``, ``data``, ``optimizer`` without the
distributed optimizer), and an individual-score drop is *blamed* on a rank only when its peers
did not drop too (everyone slowing down together = everyone waiting for someone else). The
policy (log | exclude_on_restart | stop) acts on blamed ranks after ``patience`` consecutive
reports.

Clocks (``clock``): ``forward_backward``, ``optimizer`` and ``forward_compute`` are timed here
at the hook points. On GPU with CUDA events (the host wall clock would measure kernel
*launches*), recorded on the current stream and read back without synchronising once they have
completed. On CPU with the process's CPU time: on a shared, oversubscribed machine the wall
clock mostly measures the OS scheduler (healthy ranks differed 5x on the 2-core dev box),
while CPU seconds measure the work done. ``data`` and ``checkpoint`` are the trainer's wall
clock (host work). Cost per step: a few clock reads and list appends (CUDA: 4 + 2 x
microbatches event records); per interval: one all_gather of ``1 + 2 x 5`` floats.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch

from megatron_align.config.resilience import STRAGGLER_SECTIONS, StragglerConfig
from megatron_align.errors import UserError
from megatron_align.resilience.inrank.ranks import RankInfo, all_gather_tensor, gather_rank_infos
from megatron_align.resilience.protocol.exclude_nodes import add_exclude_nodes
from megatron_align.resilience.protocol.exit_codes import EXIT_FAULTY_HARDWARE
from megatron_align.resilience.protocol.run_files import STRAGGLERS_FILE, append_record
from megatron_align.training.callbacks import Callback, TrainerView

log = logging.getLogger(__name__)

SECTIONS = STRAGGLER_SECTIONS
_CLOCKED = ("forward_backward", "optimizer", "forward_compute")  # timed here at hook points; the rest by the trainer


@dataclass(frozen=True)
class Flag:
    rank: int
    section: str
    kind: str
    """relative | individual"""
    score: float
    median_s: float
    reference_s: float
    """Best peer median (relative) or this rank's best recent median (individual)."""
    blamed: bool
    """False when the drop is shared by the rank's peers (it waited for someone else)."""


def score_stragglers(pipeline_ranks: list[int], medians: list[list[float]], individual: list[list[float]],
                     cfg: StragglerConfig, sections: tuple[str, ...] = SECTIONS) -> tuple[list[Flag], dict]:
    """Pure scoring of gathered medians (rows = ranks, columns = sections; NaN = no samples).

    Returns the flags and a summary ``{min_relative, min_individual}`` over everything scored.
    Deterministic, so every rank reaches the same verdict from the same gathered numbers.
    """
    flags: list[Flag] = []
    min_rel, min_ind = 1.0, 1.0
    world = len(medians)
    for j, section in enumerate(sections):
        for r in range(world):
            own = medians[r][j]
            if not math.isfinite(own) or own < cfg.min_section_seconds:
                continue
            peers = [p for p in range(world) if pipeline_ranks[p] == pipeline_ranks[r] and math.isfinite(medians[p][j])]
            best = min(medians[p][j] for p in peers)
            rel = best / own
            min_rel = min(min_rel, rel)
            if rel < cfg.relative_threshold:
                flags.append(Flag(r, section, "relative", rel, own, best, True))
            ind = individual[r][j]
            if not math.isfinite(ind):
                continue
            min_ind = min(min_ind, ind)
            if ind < cfg.individual_threshold:
                others = [individual[p][j] for p in peers if p != r and math.isfinite(individual[p][j])]
                blamed = not others or statistics.median(others) >= cfg.individual_threshold
                flags.append(Flag(r, section, "individual", ind, own, own * ind, blamed))
    return flags, {"min_relative": min_rel, "min_individual": min_ind}


class _HostClock:
    """Intervals on a host clock: ``time.process_time`` (CPU seconds of this process) or ``time.perf_counter``."""

    def __init__(self, now) -> None:
        self.now = now
        self._open: dict[str, float] = {}
        self._done: list[tuple[str, float]] = []

    def start(self, name: str) -> None:
        self._open[name] = self.now()

    def stop(self, name: str, minus_s: float = 0.0) -> None:
        started = self._open.pop(name, None)
        if started is not None:
            self._done.append((name, max(0.0, self.now() - started - minus_s)))

    def collect(self, block: bool = False) -> list[tuple[str, float]]:
        done, self._done = self._done, []
        return done


class _EventClock:
    """CUDA-event intervals, read back lazily (no device synchronisation on the hot path)."""

    def __init__(self) -> None:
        self._open: dict[str, torch.cuda.Event] = {}
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event, float]] = []

    def start(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._open[name] = event

    def stop(self, name: str, minus_s: float = 0.0) -> None:
        start = self._open.pop(name, None)
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((name, start, end, minus_s))

    def collect(self, block: bool = False) -> list[tuple[str, float]]:
        done, keep = [], []
        for item in self._pending:
            name, start, end, minus_s = item
            if block:
                end.synchronize()
            if block or end.query():
                done.append((name, max(0.0, start.elapsed_time(end) / 1000.0 - minus_s)))
            else:
                keep.append(item)
        self._pending = keep
        return done


def make_clock(kind: str, cuda: bool):
    """auto = CUDA events on GPU, process CPU time on CPU."""
    if kind == "auto":
        kind = "cuda" if cuda else "cpu"
    if kind == "cuda":
        if not cuda:
            raise ValueError("resilience.straggler.clock=cuda needs CUDA")
        return _EventClock()
    return _HostClock(time.process_time if kind == "cpu" else time.perf_counter)


class StragglerDetector(Callback):
    name = "straggler"
    priority = 10  # the detectors: straggler, health, loss trajectory, then numerics

    def __init__(self, cfg: StragglerConfig) -> None:
        self.cfg = cfg
        self.infos: list[RankInfo] = []
        self._samples: dict[str, list[float]] = {s: [] for s in SECTIONS if s in cfg.sections}
        self._history: dict[str, deque] = {s: deque(maxlen=cfg.history) for s in SECTIONS}
        self._streak: dict[int, int] = {}
        self._steps_seen = 0
        self._clock = None
        self._data_s = 0.0
        self._handles: list = []

    # -- sampling ---------------------------------------------------------------------------------
    def _warm(self) -> bool:
        return self._steps_seen >= self.cfg.warmup_steps

    def on_train_start(self, trainer: TrainerView) -> None:
        self.infos = gather_rank_infos()
        try:
            self._clock = make_clock(self.cfg.clock, trainer.cuda)
        except ValueError as err:
            raise UserError(str(err)) from None
        if "forward_compute" in self.cfg.sections:
            for chunk in trainer.model:
                module = getattr(chunk, "module", chunk)
                self._handles.append(module.register_forward_pre_hook(self._before_forward))
                self._handles.append(module.register_forward_hook(self._after_forward))

    def _before_forward(self, module, args) -> None:
        self._clock.start("forward_compute")

    def _after_forward(self, module, args, output) -> None:
        self._clock.stop("forward_compute")

    def on_step_start(self, trainer: TrainerView, step: int) -> None:
        self._take(self._clock.collect())
        self._clock.start("forward_backward")

    def _take(self, timings: list[tuple[str, float]]) -> None:
        if self._warm():
            for section, seconds in timings:
                if section in self._samples:
                    self._samples[section].append(seconds)

    def on_section(self, trainer: TrainerView, section: str, seconds: float) -> None:
        if section == "data":
            self._data_s = seconds
        if section in _CLOCKED:
            self._clock.stop(section, self._data_s if section == "forward_backward" else 0.0)
        elif section in self._samples and self._warm():
            self._samples[section].append(seconds)

    def on_loss(self, trainer: TrainerView, step: int, loss: float) -> None:
        self._clock.start("optimizer")

    # -- scoring ----------------------------------------------------------------------------------
    def on_step_end(self, trainer: TrainerView, step: int, record: dict) -> None:
        self._steps_seen += 1
        if self.cfg.interval and step % self.cfg.interval == 0:
            self.report(trainer, step, record)

    def _local_vector(self) -> torch.Tensor:
        self._take(self._clock.collect(block=True))
        medians, individual = [], []
        for section in SECTIONS:
            samples = self._samples.get(section)
            if not samples:
                medians.append(math.nan)
                individual.append(math.nan)
                continue
            median = statistics.median(samples)
            history = self._history[section]
            history.append(median)
            medians.append(median)
            individual.append(min(history) / median if median > 0 else 1.0)
            samples.clear()
        pp = self.infos[torch.distributed.get_rank()].pipeline_rank
        return torch.tensor([float(pp), *medians, *individual], dtype=torch.float64)

    def report(self, trainer: TrainerView, step: int, record: dict) -> list[Flag]:
        """Gather medians, score, record, apply the policy (collective: every rank, same step)."""
        gathered = all_gather_tensor(self._local_vector()).tolist()
        k = len(SECTIONS)
        flags, summary = score_stragglers([int(row[0]) for row in gathered], [row[1:1 + k] for row in gathered],
                                          [row[1 + k:] for row in gathered], self.cfg)
        blamed = sorted({f.rank for f in flags if f.blamed})
        self._streak = {r: self._streak.get(r, 0) + 1 for r in blamed}
        acting = [r for r in blamed if self._streak[r] >= self.cfg.patience]
        record.update({"straggler/min_relative_score": summary["min_relative"],
                       "straggler/min_individual_score": summary["min_individual"],
                       "straggler/num_flags": len(flags), "straggler/flagged_ranks": blamed})
        if trainer.rank == 0:
            for flag in flags:
                info = self.infos[flag.rank]
                threshold = self.cfg.relative_threshold if flag.kind == "relative" else self.cfg.individual_threshold
                append_record(trainer.run_dir, STRAGGLERS_FILE,
                              {"step": step, "rank": flag.rank, "hostname": info.hostname,
                               "local_rank": info.local_rank, "gpu": info.gpu, "section": flag.section,
                               "kind": flag.kind, "score": round(flag.score, 4), "median_s": flag.median_s,
                               "reference_s": flag.reference_s, "blamed": flag.blamed, "threshold": threshold,
                               "policy": self.cfg.policy})
                if flag.blamed:
                    log.warning("straggler at step %d: %s is slow in %s (%s score %.2f: %.4f s vs %.4f s)", step,
                                info.describe(), flag.section, flag.kind, flag.score, flag.median_s, flag.reference_s)
        if acting:
            self._act(trainer, step, acting)
        return flags

    def _act(self, trainer: TrainerView, step: int, ranks: list[int]) -> None:
        if self.cfg.policy == "log":
            return
        hosts = [self.infos[r].hostname for r in ranks]
        if trainer.rank == 0:
            add_exclude_nodes(trainer.run_dir, hosts)
            log.warning(
                "straggler policy %s: excluding %s on the next restart", self.cfg.policy, ", ".join(sorted(set(hosts)))
            )
        if self.cfg.policy == "stop":
            trainer.stop(f"straggler: ranks {ranks} at step {step}", exit_code=EXIT_FAULTY_HARDWARE)

    def on_train_end(self, trainer: TrainerView) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
