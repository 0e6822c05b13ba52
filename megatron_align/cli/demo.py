"""`megatron-align demo`: the paper's experiment in miniature on CPU (unfiltered / filtered / aligned midtraining);
the experiment is :func:`megatron_align.demo.run.run_demo`."""

from __future__ import annotations

import argparse

from megatron_align.demo.run import DemoSettings, cpu_cores, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (data, runs, table, plot, mlflow store)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per condition (each seed: 4 training runs)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (pretrain, then midtrain)")
    parser.add_argument("--midtrain-fraction", type=float, default=0.25, help="share of steps in the midtraining phase")
    parser.add_argument("--aligned-share", type=float, default=0.8,
                        help="share of midtraining samples from the synthetic aligned source (paper: ~0.01)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (WSD: decays over midtraining)")
    parser.add_argument("--world-size", type=int, default=1, help="CPU ranks per training run")
    parser.add_argument("--jobs", type=int, default=min(cpu_cores(), 4),
                        help="training runs / evals at once (default: min(cores, 4)); the cores are shared among them")
    parser.add_argument("--tracking", choices=("mlflow", "jsonl", "none"), default="mlflow",
                        help="mlflow: every run and a summary run in <out>/mlflow/mlflow.db (local, no server)")
    parser.add_argument("--quick", action="store_true", help="CI size: 1 seed, 40 steps, small corpus (a smoke test)")


def run(args: argparse.Namespace) -> int:
    return run_demo(DemoSettings(**vars(args)))
