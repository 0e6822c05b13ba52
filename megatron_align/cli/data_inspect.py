"""`megatron-align data inspect CONFIG`: arguments and printing; the report is
:mod:`megatron_align.data.schedule_report`."""

from __future__ import annotations

import argparse

from megatron_align.data.documents import document_lengths, length_summary
from megatron_align.data.schedule_report import build_sampler, describe, load_inspect_inputs, plot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML with data.sources, data.mixture, train.*, model.seq_length")
    parser.add_argument("--plot", metavar="OUT.png", help="also write a plot of the schedule")


def run(args: argparse.Namespace) -> int:
    inputs = load_inspect_inputs(args.config)
    sampler, details = build_sampler(inputs)
    print(describe(sampler, details))
    print("document lengths (attention FLOPs under data.reset_attention_mask):")
    for source in inputs.sources:
        if source.prefix and details[source.name][0] is not None:
            print(f"  {source.name:<20} {length_summary(document_lengths(source.prefix), inputs.seq_length)}")
    if args.plot:
        plot(sampler, args.plot)
        print(f"plot written to {args.plot}")
    return 0
