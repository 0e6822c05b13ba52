#!/usr/bin/env python
"""Step time with the torch profiler on vs off (profile.mode=torch), same Trainer, same process, alternating.

Each pair runs one step without the profiler and one profiled step (a fresh ProfilerCallback whose window is
that one step: start, the ma/* section ranges, stop and the Chrome trace export). The profiled step is timed
without the export (what a step inside a longer window pays); the stop + export is reported separately (paid
once per window). Alternating step by step keeps drift in the machine's load out of the ratio.

    python benchmarks/profiler_overhead.py [--pairs 20] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "examples", "tiny_cpu.yaml"))
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import logging

    from megatron_align.config import ProfileConfig, load_config
    from megatron_align.parallel.init import destroy_distributed, init_distributed
    from megatron_align.training.callbacks import CallbackList
    from megatron_align.training.profiling import ProfilerCallback
    from megatron_align.training.trainer import Trainer

    logging.getLogger("megatron_align").setLevel(logging.WARNING)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    run_dir = tempfile.mkdtemp(prefix="profiler-")
    total = 2 * args.pairs + 4
    config = load_config(args.config, ["parallel.world_size=1", f"run_dir={run_dir}", f"train.steps={total}",
                                       "logging.interval=1000", "checkpoint.interval=0", *args.overrides])
    trainer = Trainer(config, init_distributed(config, 0, 1, 0))
    iterators = trainer.data_iterators()
    for m in trainer.model:
        m.train()

    starts: list[float] = []

    def one_step(profiled: bool) -> tuple[float, float, float]:
        step = trainer.step + 1
        callback = None
        if profiled:
            callback = ProfilerCallback(ProfileConfig(mode="torch", start_step=step, end_step=step))
            trainer.callbacks = CallbackList([callback])
            trainer.callbacks.on_train_start(trainer)
            stop = callback._stop
            export = {"s": 0.0, "cpu": 0.0}

            def timed_stop(t, stop=stop, export=export):  # the once-per-window part, timed apart
                started, cpu_started = time.perf_counter(), time.process_time()
                stop(t)
                export["s"] += time.perf_counter() - started
                export["cpu"] += time.process_time() - cpu_started

            callback._stop = timed_stop
            start = callback.on_step_start

            def timed_start(t, n, start=start, export=export):  # profiler.start(): once per window too
                started, cpu_started = time.perf_counter(), time.process_time()
                start(t, n)
                export["s"] += time.perf_counter() - started
                export["cpu"] += time.process_time() - cpu_started
                export["start"] = time.perf_counter() - started

            callback.on_step_start = timed_start
        else:
            trainer.callbacks = CallbackList([])
        started, cpu = time.perf_counter(), time.process_time()
        trainer.run_step(iterators, total)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        if not profiled:
            return wall, cpu, 0.0
        starts.append(export["start"])
        return wall - export["s"], cpu - export["cpu"], export["s"] - export["start"]

    for _ in range(2):
        one_step(False), one_step(True)
    off, on, exports = [], [], []
    starts.clear()
    for _ in range(args.pairs):
        off.append(one_step(False)[:2])
        wall, cpu_s, exported = one_step(True)
        on.append((wall, cpu_s))
        exports.append(exported)
    med = statistics.median
    off_wall, on_wall = med(w for w, _ in off), med(w for w, _ in on)
    print(f"config {args.config} {' '.join(args.overrides)}; {args.pairs} pairs; medians")
    off_cpu, on_cpu = med(c for _, c in off), med(c for _, c in on)
    print(f"wall s/step  off {off_wall:.4f}  on {on_wall:.4f}  (+{on_wall - off_wall:.4f} s, "
          f"x{on_wall / off_wall:.3f})")
    print(f"CPU s/step   off {off_cpu:.4f}  on {on_cpu:.4f}  (+{on_cpu - off_cpu:.4f} s, x{on_cpu / off_cpu:.3f})")
    trace = os.path.join(run_dir, "profile", os.listdir(os.path.join(run_dir, "profile"))[0])
    print(f"per window: profiler start {med(starts):.3f} s, stop + Chrome trace export {med(exports):.3f} s; "
          f"trace {os.path.getsize(trace) / 1e6:.1f} MB for one step")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
