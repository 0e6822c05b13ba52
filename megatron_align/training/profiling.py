"""Profiling a step range (``profile:`` config): torch profiler traces per rank, NVTX ranges, nsys, memory snapshots.

- ``mode: torch``: the torch profiler runs from ``start_step`` to ``end_step`` on ``ranks`` (default every rank)
  and writes one Chrome trace per rank, ``<run_dir>/profile/rank<R>_steps<S>-<E>.trace.json`` (open it in
  Perfetto / chrome://tracing). Each rank decides alone (no collective), so profiling some ranks cannot make
  the others wait in one; they only run slower by the profiler's overhead.
- ``mode: nsys``: ``torch.cuda.profiler.start()/stop()`` at the same steps, for ``nsys profile
  --capture-range=cudaProfilerApi`` (``slurm render`` writes that wrapper). CUDA only.
- Sections: ``ma/step_<N>``, ``ma/data``, ``ma/forward_backward``, ``ma/optimizer``, ``ma/checkpoint`` ranges
  in the trace (``record_function``) and, with CUDA, as NVTX ranges for nsys. Outside the window a section costs
  one attribute check.
- Memory (CUDA only): ``memory_snapshot_step`` records the allocator history from the start and dumps
  ``profile/memory_rank<R>_step<N>.pickle`` after that step (read it at pytorch.org/memory_viz);
  ``memory_snapshot_on_oom`` dumps ``memory_rank<R>_oom.pickle`` when a step raises OutOfMemoryError.

``megatron-align profile summarize RUN_DIR`` (:func:`summarize`) reads the traces back: per rank and step, time
in compute, communication, data loading, optimizer, checkpoint and idle, and the slowest rank's gap.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re

from megatron_align.config import ProfileConfig
from megatron_align.errors import UserError
from megatron_align.training.callbacks import Callback

log = logging.getLogger(__name__)

SECTIONS = ("data", "forward_backward", "optimizer", "checkpoint")
_COMM = re.compile(r"nccl|gloo|all_?reduce|all_?gather|reduce_?scatter|broadcast|all_to_all|alltoall|barrier|"
                   r"c10d::|record_param_comms|(^|[:_])(send|recv)", re.IGNORECASE)


class _Sections:
    """The trainer's section ranges: record_function while the torch profiler runs, NVTX when asked."""

    torch_on = False
    nvtx_on = False

    def __call__(self, name: str):
        if not (self.torch_on or self.nvtx_on):
            return contextlib.nullcontext()
        return self._range(name)

    @contextlib.contextmanager
    def _range(self, name: str):
        import torch

        stack = contextlib.ExitStack()
        with stack:
            if self.torch_on:
                stack.enter_context(torch.profiler.record_function(f"ma/{name}"))
            if self.nvtx_on:
                torch.cuda.nvtx.range_push(f"ma/{name}")
                stack.callback(torch.cuda.nvtx.range_pop)
            yield


section = _Sections()
"""``with section("optimizer"): ...`` in the trainer."""


def trace_path(run_dir: str, rank: int, cfg: ProfileConfig) -> str:
    return os.path.join(run_dir, "profile", f"rank{rank}_steps{cfg.start_step}-{cfg.end_step}.trace.json")


def build_callbacks(config) -> list:
    cfg: ProfileConfig = config.profile
    if cfg.mode == "none" and not cfg.memory_snapshot_step and not cfg.memory_snapshot_on_oom:
        return []
    return [ProfilerCallback(cfg)]


class ProfilerCallback(Callback):
    priority = -200  # first: the profiled step range opens before any other hook of the step runs
    name = "profiler"

    def __init__(self, cfg: ProfileConfig) -> None:
        self.cfg = cfg
        self.profiler = None
        self._step_range = None
        self.started = False
        self.cuda = False
        self.active = False

    def on_train_start(self, trainer) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.active = not self.cfg.ranks or trainer.rank in self.cfg.ranks
        nvtx = self.cfg.nvtx == "true" or (self.cfg.nvtx == "auto" and self.cfg.mode != "none")
        section.nvtx_on = self.cuda and nvtx
        if self.cfg.mode == "nsys" and not self.cuda and trainer.rank == 0:
            log.warning("profile.mode=nsys: no CUDA device here; the CUDA profiler is not started")
        if (self.cfg.memory_snapshot_step or self.cfg.memory_snapshot_on_oom) and self.active:
            if self.cuda:
                torch.cuda.memory._record_memory_history(max_entries=100_000)
            elif trainer.rank == 0:
                log.warning("profile.memory_snapshot_*: CUDA only; no memory snapshot on this host")

    def on_step_start(self, trainer, step: int) -> None:
        if not self.active:
            return
        import torch

        if self.cfg.start_step <= step <= self.cfg.end_step and not self.started:  # a resume inside the window
            self.started = True  # starts at its first step
            if self.cfg.mode == "torch":
                activities = [torch.profiler.ProfilerActivity.CPU]
                if self.cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities, record_shapes=self.cfg.record_shapes,
                                                       with_stack=self.cfg.with_stack)
                self.profiler.start()
                section.torch_on = True
            elif self.cfg.mode == "nsys" and self.cuda:
                torch.cuda.profiler.start()
        if self.cfg.start_step <= step <= self.cfg.end_step and section.torch_on:
            self._step_range = torch.profiler.record_function(f"ma/step_{step}")
            self._step_range.__enter__()

    def on_step_end(self, trainer, step: int, record: dict) -> None:
        if not self.active:
            return
        import torch

        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if step == self.cfg.end_step:
            self._stop(trainer)
        if step == self.cfg.memory_snapshot_step and self.cuda:
            self._dump_memory(trainer, f"step{step}")
        if self.cfg.mode == "nsys" and self.cuda and self.started and step == self.cfg.end_step:
            torch.cuda.profiler.stop()

    def _stop(self, trainer) -> None:
        if self.profiler is None:
            return
        section.torch_on = False
        self.profiler.stop()
        path = trace_path(trainer.run_dir, trainer.rank, self.cfg)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.profiler.export_chrome_trace(path + ".tmp")
        os.replace(path + ".tmp", path)
        self.profiler = None
        log.info("rank %d: profiler trace of steps %d-%d: %s", trainer.rank, self.cfg.start_step, self.cfg.end_step,
                 path)

    def _dump_memory(self, trainer, tag: str) -> None:
        import torch

        path = os.path.join(trainer.run_dir, "profile", f"memory_rank{trainer.rank}_{tag}.pickle")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.cuda.memory._dump_snapshot(path)
        log.warning("rank %d: CUDA memory snapshot %s (open at https://pytorch.org/memory_viz)", trainer.rank, path)

    def on_train_end(self, trainer) -> None:
        self._stop(trainer)  # a run that ended inside the window still leaves its trace
        section.torch_on = section.nvtx_on = False

    def on_error(self, trainer, error: BaseException) -> None:
        import torch

        if self.cuda and self.cfg.memory_snapshot_on_oom and isinstance(error, torch.cuda.OutOfMemoryError):
            self._dump_memory(trainer, "oom")
        self._stop(trainer)
        section.torch_on = section.nvtx_on = False


# -- profile summarize ---------------------------------------------------------------------------------------


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals, within: list[tuple[float, float]] | None = None) -> float:
    """Total length of the union of ``intervals`` (clipped to the union of ``within``), in the trace's units."""
    spans = _union(intervals)
    if within is None:
        return sum(b - a for a, b in spans)
    total = 0.0
    for a, b in spans:
        for c, d in _union(within):
            total += max(0.0, min(b, d) - max(a, c))
    return total


def rank_breakdown(trace: dict) -> dict[int, dict[str, float]]:
    """Per profiled step: seconds in compute, communication, data, optimizer, checkpoint and idle (see module doc)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = {int(e["name"][len("ma/step_"):]): (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
             for e in events if str(e.get("name", "")).startswith("ma/step_")}
    by_name: dict[str, list[tuple[float, float]]] = {s: [] for s in SECTIONS}
    comm: list[tuple[float, float]] = []
    for e in events:
        name = str(e.get("name", ""))
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        if name.startswith("ma/") and name[3:] in by_name:
            by_name[name[3:]].append(span)
        elif e.get("cat") in ("cpu_op", "user_annotation", "kernel", "gpu_user_annotation") and _COMM.search(name):
            comm.append(span)
    out = {}
    for step, window in sorted(steps.items()):
        w = [window]
        part = {s: [(max(a, window[0]), min(b, window[1])) for a, b in by_name[s] if b > window[0] and a < window[1]]
                for s in SECTIONS}
        comm_in = [(max(a, window[0]), min(b, window[1])) for a, b in comm if b > window[0] and a < window[1]]
        data = _length(part["data"])
        communication = _length(comm_in)
        optimizer = _length(part["optimizer"]) - _length(comm_in, part["optimizer"])
        compute = (_length(part["forward_backward"]) - _length(part["data"], part["forward_backward"])
                   - _length(comm_in, part["forward_backward"]))
        busy = _length(part["data"] + part["forward_backward"] + part["optimizer"] + part["checkpoint"] + comm_in, w)
        out[step] = {k: v / 1e6 for k, v in {
            "step": window[1] - window[0], "compute": max(0.0, compute), "communication": communication,
            "data": data, "optimizer": max(0.0, optimizer), "checkpoint": _length(part["checkpoint"]),
            "idle": max(0.0, window[1] - window[0] - busy)}.items()}
    return out


def summarize(run_dir: str) -> dict:
    """Every rank's trace under run_dir/profile: per-rank mean seconds per step, and the slowest rank's gap."""
    paths = sorted(glob.glob(os.path.join(run_dir, "profile", "rank*_steps*.trace.json")))
    if not paths:
        raise UserError(f"{run_dir}/profile: no rank*_steps*.trace.json traces (train with profile.mode=torch)")
    ranks: dict[int, dict] = {}
    for path in paths:
        rank = int(re.match(r"rank(\d+)_", os.path.basename(path)).group(1))
        try:
            with open(path) as f:
                steps = rank_breakdown(json.load(f))
        except ValueError as err:
            raise UserError(f"{path}: not a Chrome trace JSON ({err}); was the run killed while writing it?") from None
        if not steps:
            raise UserError(f"{path}: no ma/step_<N> ranges (a trace from another tool?)")
        keys = next(iter(steps.values())).keys()
        ranks[rank] = {"steps": sorted(steps), "per_step": steps,
                       "mean": {k: sum(s[k] for s in steps.values()) / len(steps) for k in keys}}
    slowest = max(ranks, key=lambda r: ranks[r]["mean"]["step"])
    fastest = min(ranks, key=lambda r: ranks[r]["mean"]["step"])
    return {"ranks": ranks, "slowest_rank": slowest, "fastest_rank": fastest,
            "gap_s": ranks[slowest]["mean"]["step"] - ranks[fastest]["mean"]["step"]}


def format_summary(summary: dict) -> str:
    cols = ("step", "compute", "communication", "data", "optimizer", "checkpoint", "idle")
    lines = ["seconds per step (mean over the profiled steps)",
             f"{'rank':>4} {'steps':>9} " + " ".join(f"{c:>13}" for c in cols)]
    for rank, r in sorted(summary["ranks"].items()):
        span = f"{r['steps'][0]}-{r['steps'][-1]}"
        lines.append(f"{rank:>4} {span:>9} " + " ".join(f"{r['mean'][c]:>13.4f}" for c in cols))
    s = summary
    lines.append(f"slowest rank {s['slowest_rank']}: {s['gap_s']:.4f} s/step behind the fastest (rank "
                 f"{s['fastest_rank']})")
    return "\n".join(lines)
