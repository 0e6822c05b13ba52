#!/usr/bin/env python
"""Step time of megatron_align's Trainer vs a bare Megatron-Core loop: same model, data, layout, one process.

Both loops drive the *same* Megatron-Core objects (GPTModel chunks in DDP, optimizer, scheduler, the same
samples). The bare loop is what a hand-written Megatron-Core script does per step: zero grads, the
forward/backward schedule, optimizer + LR step, a loss all-reduce. Ours is `Trainer.run_step` (callbacks,
metrics record, console line, metrics.jsonl, async-checkpoint polling). Rounds alternate A/B so drift in
machine load hits both; the ratio of medians is reported. Goal: <= 1.02.

    python benchmarks/trainer_overhead.py [--rounds 8] [--steps 5] [key=value ...]
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
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per round per loop")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from megatron_align.config import load_config
    from megatron_align.parallel.init import destroy_distributed, init_distributed
    from megatron_align.training.trainer import Trainer

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    run_dir = tempfile.mkdtemp(prefix="overhead-")
    total = 2 * args.rounds * args.steps + 2
    config = load_config(args.config, ["parallel.world_size=1", f"run_dir={run_dir}", f"train.steps={total}",
                                       "logging.interval=1", "checkpoint.interval=0", *args.overrides])
    layout = init_distributed(config, 0, 1, 0)
    trainer = Trainer(config, layout)
    iterators = trainer.data_iterators()

    def bare_step():
        for m in trainer.model:
            m.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        losses = trainer.forward_backward(
            forward_step_func=trainer._forward_step,
            data_iterator=iterators,
            model=trainer.model,
            num_microbatches=trainer.num_microbatches,
            seq_length=config.model.seq_length,
            micro_batch_size=config.train.micro_batch_size,
            decoder_seq_length=config.model.seq_length,
            forward_only=False,
        )
        ok, _, _ = trainer.optimizer.step()
        if ok:
            trainer.scheduler.step(increment=1)
        loss = torch.stack([x["lm loss"] for x in losses]).sum(0)
        torch.distributed.all_reduce(loss)
        float(loss[0] / loss[1])
        trainer.step += 1
        trainer.consumed_samples += config.train.global_batch_size

    def ours_step():
        trainer.run_step(iterators, total)

    for m in trainer.model:
        m.train()
    ours_step(), bare_step()  # warm-up
    timings = {"bare": [], "ours": []}
    for r in range(args.rounds):
        for name, fn in (
            (("bare", bare_step), ("ours", ours_step)) if r % 2 == 0 else (("ours", ours_step), ("bare", bare_step))
        ):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.steps):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timings[name].append((time.perf_counter() - started) / args.steps)
    bare, ours = statistics.median(timings["bare"]), statistics.median(timings["ours"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}; config: {os.path.relpath(args.config, REPO)} {' '.join(args.overrides)}")
    print(f"bare Megatron-Core loop: {bare * 1e3:.1f} ms/step (median of {args.rounds} rounds x {args.steps} steps)")
    print(f"megatron_align Trainer:  {ours * 1e3:.1f} ms/step")
    print(f"ratio ours/bare: {ours / bare:.3f}  (goal <= 1.02)")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
