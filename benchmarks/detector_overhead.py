#!/usr/bin/env python
"""Step time with / without the in-rank resilience detectors: same Trainer, same process, alternating rounds.

"with" = the callbacks `megatron_align.resilience.inrank.build_callbacks` makes for the config (straggler
timing + scores, health checks, numerics, loss trajectory), with the straggler, collective and
trajectory intervals shortened to --check-interval (defaults are 100/100/50 steps, so this
overstates the amortised cost). "without" = no callbacks. Steps alternate with/without, so drift
in machine load hits both. The costlier opt-in checks (SDC GEMM, DP parameter hash) are timed per
call and amortised over their interval separately. On a shared machine the A/B ratio still carries
the load's noise, so the time spent inside the detectors' hooks is also measured directly.
Goal: with/without <= 1.01.

    python benchmarks/detector_overhead.py [--pairs 60] [--check-interval 10] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "examples", "tiny_cpu.yaml"))
    parser.add_argument("--pairs", type=int, default=60, help="steps with and steps without the detectors")
    parser.add_argument("--check-interval", type=int, default=10, help="straggler/collective/trajectory interval")
    parser.add_argument("--sdc-size", type=int, default=1024)
    parser.add_argument("--sdc-interval", type=int, default=100, help="for the amortised SDC cost")
    parser.add_argument("--hash-interval", type=int, default=100, help="for the amortised parameter-hash cost")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from megatron_align.config import load_config
    from megatron_align.parallel.init import destroy_distributed, init_distributed
    from megatron_align.resilience.inrank import build_callbacks
    from megatron_align.resilience.inrank.health import SdcGemm, param_checksum
    from megatron_align.training.callbacks import CallbackList
    from megatron_align.training.trainer import Trainer

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29563")
    run_dir = tempfile.mkdtemp(prefix="detectors-")
    total = 2 * args.pairs + 5  # + warm-up
    n = args.check_interval
    config = load_config(args.config, [
        "parallel.world_size=1", f"run_dir={run_dir}", f"train.steps={total}", "logging.interval=1",
        "checkpoint.interval=0", f"resilience.straggler.interval={n}", "resilience.straggler.warmup_steps=0",
        f"resilience.health.collective_interval={n}", f"resilience.trajectory.interval={n}",
        "resilience.trajectory.warmup_steps=0", "resilience.trajectory.min_points=3", *args.overrides])
    layout = init_distributed(config, 0, 1, 0)
    trainer = Trainer(config, layout)
    detectors = build_callbacks(config)
    names = [type(cb).__name__ for cb in detectors]
    iterators = trainer.data_iterators()
    for m in trainer.model:
        m.train()

    inside = {"s": 0.0}

    def timed_hook(fn):
        def timed(*a, **k):
            started = time.perf_counter()
            result = fn(*a, **k)
            inside["s"] += time.perf_counter() - started
            return result

        return timed

    for cb in detectors:  # the model forward hooks (straggler's forward_compute clock) count too
        for attr in ("_before_forward", "_after_forward"):
            if hasattr(cb, attr):
                setattr(cb, attr, timed_hook(getattr(cb, attr)))

    class TimedCallbacks(CallbackList):
        """Adds up the wall time spent inside the detectors' trainer hooks."""

        def __getattr__(self, hook: str):
            call_all = super().__getattr__(hook)

            def timed(*a, **k):
                started = time.perf_counter()
                call_all(*a, **k)
                inside["s"] += time.perf_counter() - started

            return timed

    def one_step(with_detectors: bool) -> tuple[float, float]:
        trainer.callbacks = TimedCallbacks(detectors if with_detectors else [])
        if with_detectors:
            trainer.callbacks.on_train_start(trainer)  # registers the forward hooks (outside the timing)
            inside["s"] = 0.0
        if trainer.cuda:
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.run_step(iterators, total)
        if trainer.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started, time.process_time() - cpu_started
        if with_detectors:
            hooks_s.append(inside["s"])
            trainer.callbacks.on_train_end(trainer)  # removes the hooks again
        return elapsed

    hooks_s: list[float] = []
    for _ in range(2):  # warm-up
        one_step(False), one_step(True)
    hooks_s.clear()
    timings = {True: [], False: []}
    # Alternate every step: load drifts on this shared box over seconds, so rounds of several steps
    # per variant measured the drift (a ratio of 1.2 with *no* detectors at all). Odd steps run without,
    # even steps with the detectors, so every check (even intervals) lands in a "with" step.
    while trainer.step < total - 1:
        variant = (trainer.step + 1) % 2 == 0
        timings[variant].append(one_step(variant))
    with_s, without_s = (statistics.mean(t for t, _ in timings[v]) for v in (True, False))
    with_cpu, without_cpu = (statistics.mean(c for _, c in timings[v]) for v in (True, False))
    with_med, without_med = (statistics.median(t for t, _ in timings[v]) for v in (True, False))
    in_hooks = statistics.mean(hooks_s)

    device = torch.device("cuda", torch.cuda.current_device()) if trainer.cuda else torch.device("cpu")
    gemm = SdcGemm(args.sdc_size, 0, device)
    gemm.checksum()
    sdc_s = statistics.median(gemm.checksum()[1] for _ in range(5))
    hash_times = []
    for _ in range(5):
        started = time.perf_counter()
        int(param_checksum(trainer.model))
        hash_times.append(time.perf_counter() - started)
    hash_s = statistics.median(hash_times)
    params = sum(p.numel() for m in trainer.model for p in m.module.parameters())

    name = torch.cuda.get_device_name() if trainer.cuda else "CPU"
    print(f"device: {name}; config: {os.path.relpath(args.config, REPO)} {' '.join(args.overrides)}")
    print(f"detectors: {', '.join(names)}; straggler/collective/trajectory checks every {n} steps")
    print(f"without detectors: {without_s * 1e3:.1f} ms/step wall (median {without_med * 1e3:.1f}), "
          f"{without_cpu * 1e3:.1f} ms/step CPU (mean of {len(timings[False])} alternating steps)")
    print(
        f"with detectors:    {with_s * 1e3:.1f} ms/step wall (median {with_med * 1e3:.1f}), "
        f"{with_cpu * 1e3:.1f} ms/step CPU"
    )
    print(f"ratio with/without: {with_s / without_s:.4f} wall (medians {with_med / without_med:.4f}), "
          f"{with_cpu / without_cpu:.4f} CPU  (goal <= 1.01)")
    print(
        f"time inside the detectors' hooks (trainer + forward): {in_hooks * 1e3:.3f} ms/step = "
        f"{in_hooks / without_s:.3%} of a step"
    )
    print(f"SDC GEMM {args.sdc_size}^2 fp32: {sdc_s * 1e3:.2f} ms per check = "
          f"{sdc_s / args.sdc_interval / without_s:.2%} of a step at interval {args.sdc_interval}")
    print(f"parameter hash ({params / 1e6:.2f} M params): {hash_s * 1e3:.2f} ms per check = "
          f"{hash_s / args.hash_interval / without_s:.2%} of a step at interval {args.hash_interval}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
