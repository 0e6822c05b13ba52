#!/usr/bin/env python
"""Training throughput of a preset on the hardware at hand: tokens/s, TFLOP/s per GPU and MFU, per layer spec.

Runs megatron_align's own ``Trainer`` (Megatron-Core schedules, DDP, optimizer) on random tokens
(``data.mock=true``) for each requested ``model.spec`` in turn, in one process, so the specs are compared
side by side on the same machine and the same config. Each spec gets ``--warmup`` untimed steps, then
``--steps`` timed optimizer steps (CUDA-synchronised). FLOPs per token are the trainer's
(:func:`megatron_align.training.metrics.flops_per_token`: 6 x linear parameters + output layer + attention),
so TFLOP/s is *model* FLOP/s (recompute not counted). MFU = achieved FLOP/s / the GPU's dense peak: BF16
peak for bf16 runs; FP8 runs report both (vs the BF16 peak, the usual convention, and vs the FP8 peak).
On a machine without CUDA it still runs (fp32) and reports tokens/s, with "MFU n/a".

    python benchmarks/throughput.py --config examples/llama_1b.yaml --specs local,portable,te [key=value ...]
    python benchmarks/throughput.py --config examples/llama_1b.yaml --specs te precision=fp8 fp8.recipe=tensorwise
    torchrun --nproc-per-node 8 benchmarks/throughput.py --config examples/llama3_8b.yaml --specs te

Goal (issue 5): >= 50% MFU in BF16 for a >= 1B model on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rank_env() -> tuple[int, int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    return 0, 1, 0


def measure(config_path: str, spec: str, overrides: list[str], steps: int, warmup: int, port: int) -> dict:
    import torch

    from megatron_align.config import load_config
    from megatron_align.model.builder import resolve_precision
    from megatron_align.parallel.init import destroy_distributed, init_distributed
    from megatron_align.training.metrics import flops_per_token, peak_flops_per_gpu
    from megatron_align.training.trainer import Trainer

    rank, world, local_rank = _rank_env()
    if world == 1:
        os.environ["MASTER_PORT"] = str(port)
    run_dir = tempfile.mkdtemp(prefix=f"throughput-{spec}-")
    total = warmup + steps
    config = load_config(config_path, [f"model.spec={spec}", "data.mock=true", f"parallel.world_size={world}",
                                       f"run_dir={run_dir}", f"train.steps={total}", "checkpoint.interval=0",
                                       "logging.interval=1000000", *overrides])
    layout = init_distributed(config, rank, world, local_rank)
    try:
        trainer = Trainer(config, layout)
        for m in trainer.model:
            m.train()
        iterators = trainer.data_iterators()
        times, losses = [], []
        for i in range(total):
            if trainer.cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            loss, _, _ = trainer.train_step(iterators)
            if trainer.cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - started)
                losses.append(loss)
        step_s = statistics.median(times)
        tokens_per_step = config.train.global_batch_size * config.model.seq_length
        tokens_per_s = tokens_per_step / step_s
        tflops = flops_per_token(config, trainer.padded_vocab_size) * tokens_per_s / world / 1e12
        precision = "fp8" if config.precision == "fp8" else resolve_precision(config)
        result = {"spec": spec, "precision": precision, "world_size": world, "step_s": step_s,
                  "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / world,
                  "tflops_per_gpu": tflops, "final_loss": losses[-1],
                  "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if trainer.cuda else None}
        bf16_peak = peak_flops_per_gpu("bf16") if trainer.cuda else None
        result["mfu"] = tflops * 1e12 / bf16_peak if bf16_peak else None
        if precision == "fp8":
            fp8_peak = peak_flops_per_gpu("fp8")
            result["mfu_vs_fp8_peak"] = tflops * 1e12 / fp8_peak if fp8_peak else None
        if precision == "fp32" and trainer.cuda:
            fp32_peak = peak_flops_per_gpu("fp32")
            result["mfu"] = tflops * 1e12 / fp32_peak if fp32_peak else None
        trainer.checkpoints.close()
        return result
    finally:
        destroy_distributed()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "examples", "tiny_cpu.yaml"))
    parser.add_argument("--specs", default="local,portable", help="comma-separated model.spec values to compare")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per spec (median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per spec")
    parser.add_argument("--json", dest="json_path", help="also write the results to this file")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. model.num_layers=8 train.global_batch_size=8"
    )
    args = parser.parse_args()

    import torch

    results = []
    for i, spec in enumerate(s for s in args.specs.split(",") if s):
        results.append(measure(args.config, spec, args.overrides, args.steps, args.warmup, 29660 + i))
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; config: {os.path.relpath(args.config, REPO)} {' '.join(args.overrides)}")
    print(f"{'spec':9} {'precision':9} {'step s':>8} {'tokens/s':>10} {'tok/s/GPU':>10} {'TFLOP/s/GPU':>11} "
          f"{'MFU':>7} {'mem GiB':>8} {'loss':>8}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        if r.get("mfu_vs_fp8_peak"):
            mfu += f" ({100 * r['mfu_vs_fp8_peak']:.1f}% of FP8 peak)"
        mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "-"
        print(f"{r['spec']:9} {r['precision']:9} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} "
              f"{r['tokens_per_s_per_gpu']:10.0f} {r['tflops_per_gpu']:11.3f} {mfu:>7} {mem:>8} {r['final_loss']:8.4f}")
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(f"{r['spec']} / {base['spec']} tokens/s: {r['tokens_per_s'] / base['tokens_per_s']:.3f}")
    if args.json_path:
        tmp = args.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {"device": device, "config": args.config, "overrides": args.overrides, "results": results}, f, indent=1
            )
        os.replace(tmp, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
