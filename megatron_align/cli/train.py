"""`megatron-align train CONFIG.yaml [key=value ...]`: train from a config (spawns local ranks or joins torchrun/srun).

The work is :func:`megatron_align.training.launch.train`; the process that only spawns ranks imports no torch.
"""

from __future__ import annotations

import argparse

from megatron_align.training.launch import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 parallel.tensor=2")


def run(args: argparse.Namespace) -> int:
    return train(args.config, args.overrides)
