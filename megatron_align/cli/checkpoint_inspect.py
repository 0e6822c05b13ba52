"""`megatron-align checkpoint inspect DIR [--json]`: a checkpoint's step, layout, data position, config and
tensors (:mod:`megatron_align.convert.checkpoint_report`); for a Megatron-LM / Megatron-Bridge checkpoint, what was
found and what a run will use (:mod:`megatron_align.convert.megatron_lm`)."""

from __future__ import annotations

import argparse
import json

from megatron_align.convert.checkpoint_report import describe_checkpoint, format_description


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run's checkpoints/ dir (newest complete) or one iter_XXXXXXX dir; "
                        "or a Megatron-LM / Megatron-Bridge checkpoint dir")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from megatron_align.convert import megatron_lm

    foreign = megatron_lm.is_megatron_lm(args.checkpoint)
    description = (megatron_lm.describe if foreign else describe_checkpoint)(args.checkpoint)
    text = (megatron_lm.format_description if foreign else format_description)(description)
    print(json.dumps(description, indent=1, default=str) if args.json else text)
    return 0
