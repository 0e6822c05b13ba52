#!/usr/bin/env python
"""Document masking (data.reset_attention_mask + eod_mask_loss): its step-time cost, and its effect on planned MFU.

``cpu``: two Trainers in one process (same model, data, layout; one with document masking), rounds alternating
A/B so machine-load drift hits both; reports the median step time of each and their ratio.

``mfu``: the planner's step time and MFU for a config's own layout, with attention counted causal over whole
windows vs over the document pieces (arithmetic.attention_span) of a phase's mixture. Document lengths come
from the sources' ``.idx`` when they exist, else from a stated stand-in: exponential lengths with the given
means (``--web-mean``, ``--synthetic-mean``).

    python benchmarks/document_masking.py cpu [--rounds 6] [--steps 3] [key=value ...]
    python benchmarks/document_masking.py mfu [--config examples/paper/alignment_upsampled.yaml] [--phase midtrain]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASKING = ["data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true"]


def cpu(args) -> int:
    import torch

    from megatron_align.config import load_config
    from megatron_align.corpus.indexed import write_indexed_dataset
    from megatron_align.corpus.tokenizer import ByteTokenizer
    from megatron_align.data.synthetic import general_documents
    from megatron_align.model.documents import document_ids
    from megatron_align.parallel.init import destroy_distributed, init_distributed
    from megatron_align.training.trainer import Trainer

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29563")
    work = tempfile.mkdtemp(prefix="docmask-")
    tok = ByteTokenizer()
    prefix = os.path.join(work, "web")
    write_indexed_dataset((tok.encode(t) for t in general_documents(3000, seed=0)), prefix, tok.vocab_size, tok.eod)
    total = args.rounds * args.steps + 2
    base = ["parallel.world_size=1", f"train.steps={total}", "checkpoint.interval=0", "model.spec=local",
            f"data.sources=[{{name: web, prefix: {prefix}}}]", *args.overrides]
    configs = {"plain": load_config(args.config, base + [f"run_dir={work}/plain"]),
               "masked": load_config(args.config, base + MASKING + [f"run_dir={work}/masked"])}
    layout = init_distributed(configs["plain"], 0, 1, 0)
    trainers = {name: Trainer(config, layout) for name, config in configs.items()}
    iterators = {name: t.data_iterators() for name, t in trainers.items()}
    for name, trainer in trainers.items():
        trainer.train_step(iterators[name])  # warm-up
    timings: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(args.rounds):
        for name in (("plain", "masked") if r % 2 == 0 else ("masked", "plain")):
            started = time.perf_counter()
            for _ in range(args.steps):
                trainers[name].train_step(iterators[name])
            timings[name].append((time.perf_counter() - started) / args.steps)
    batch = next(trainers["masked"].data.microbatches(0))
    docs = float((document_ids(batch["tokens"], tok.eod)[:, -1] + 1).float().mean())
    config = configs["plain"]
    print(f"device: CPU ({torch.get_num_threads()} threads); config: {os.path.relpath(args.config, REPO)} "
          f"{' '.join(args.overrides)}; seq {config.model.seq_length}, micro batch {config.train.micro_batch_size}, "
          f"global batch {config.train.global_batch_size}; {docs:.1f} documents per window")
    plain, masked = statistics.median(timings["plain"]), statistics.median(timings["masked"])
    print(f"without masking: {plain * 1e3:.1f} ms/step (median of {args.rounds} rounds x {args.steps} steps)")
    print(f"with masking:    {masked * 1e3:.1f} ms/step")
    print(f"ratio masked/plain: {masked / plain:.3f}")
    destroy_distributed()
    return 0


def _phase_span(config, phase: str, web_mean: float, synthetic_mean: float) -> tuple[float, list[str]]:
    """The mean attention span of one phase's windows: sources weighted by the phase's mixture weights."""
    from megatron_align.data.documents import document_lengths
    from megatron_align.model.arithmetic import attention_span

    seq = config.model.seq_length
    weights = next(p.weights for p in config.data.mixture.phases if p.name == phase)
    rng = np.random.default_rng(0)
    span, lines = 0.0, []
    for source in config.data.sources:
        if not weights.get(source.name):
            continue
        if os.path.isfile(source.prefix + ".idx"):
            lengths, origin = document_lengths(source.prefix), source.prefix
        else:
            mean = synthetic_mean if "synthetic" in source.name else web_mean
            lengths = np.maximum(1, rng.exponential(mean, 200_000).round()).astype(np.int64)
            origin = f"stand-in: exponential, mean {mean:g} tokens"
        source_span = attention_span(lengths, seq)
        span += weights[source.name] * source_span / sum(weights.values())
        lines.append(f"  {source.name:<20} weight {weights[source.name]:<5g} span {source_span:7.1f} of {seq} "
                     f"({origin})")
    return span, lines


def mfu(args) -> int:
    from megatron_align.config import load_config
    from megatron_align.model.arithmetic import ModelShape, get_gpu
    from megatron_align.parallel.planner import PlanOptions, configured_candidate, evaluate_layout

    config = load_config(args.config, args.overrides)
    gpu = get_gpu(args.gpu)
    layout = configured_candidate(config, args.gpus)
    options = PlanOptions(precision=config.precision if config.precision in ("bf16", "fp8") else "bf16")
    model = ModelShape.from_config(config.model)
    span, lines = _phase_span(config, args.phase, args.web_mean, args.synthetic_mean)
    masked = dataclasses.replace(model, attention_span=span)
    causal = evaluate_layout(model, layout, gpu, options, config.train.global_batch_size)
    docmask = evaluate_layout(masked, layout, gpu, options, config.train.global_batch_size)
    # What a run would log if it kept counting causal attention over whole windows at the masked speed.
    overstated = causal.mfu * causal.step_time_s / docmask.step_time_s
    print(f"config: {os.path.relpath(args.config, REPO)}, phase {args.phase}; {args.gpus} x {gpu.name}, layout "
          f"{layout.label}, micro batch {layout.micro_batch_size}, {options.precision}")
    print(f"phase attention span: {span:.1f} of {model.seq_length} tokens")
    print("\n".join(lines))
    causal_flops, masked_flops = model.flops_per_token(layout.tp), masked.flops_per_token(layout.tp)
    print(f"FLOPs per token: causal {causal_flops:.4e}, document-masked {masked_flops:.4e} "
          f"({masked_flops / causal_flops - 1:+.2%})")
    print(f"step time: {causal.step_time_s:.3f} s -> {docmask.step_time_s:.3f} s "
          f"({docmask.step_time_s / causal.step_time_s - 1:+.2%})")
    print(f"MFU: {causal.mfu:.2%} without masking -> {docmask.mfu:.2%} with masking, counted right "
          f"({overstated:.2%} if attention were still counted causal over whole windows)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cpu", help="step time with vs without masking on the CPU tiny run")
    c.add_argument("--config", default=os.path.join(REPO, "examples", "tiny_cpu.yaml"))
    c.add_argument("--rounds", type=int, default=6)
    c.add_argument("--steps", type=int, default=3, help="steps per round per trainer")
    c.add_argument("overrides", nargs="*")
    m = sub.add_parser("mfu", help="planned step time and MFU with vs without masking")
    m.add_argument("--config", default=os.path.join(REPO, "examples", "paper", "alignment_upsampled.yaml"))
    m.add_argument("--phase", default="midtrain")
    m.add_argument("--gpus", type=int, default=64)
    m.add_argument("--gpu", default="H100")
    m.add_argument("--web-mean", type=float, default=1000.0, help="stand-in mean web document length (tokens)")
    m.add_argument("--synthetic-mean", type=float, default=2000.0, help="stand-in mean synthetic document length")
    m.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    return cpu(args) if args.what == "cpu" else mfu(args)


if __name__ == "__main__":
    sys.exit(main())
