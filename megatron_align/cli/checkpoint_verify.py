"""`megatron-align checkpoint verify DIR`: recompute a checkpoint's file checksums against its marker
(:func:`megatron_align.training.checksums.verify_checkpoints`); exit 1 naming the first bad file."""

from __future__ import annotations

import argparse
import sys

from megatron_align.training.checksums import verify_checkpoints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", help="one iter_* checkpoint directory, or a checkpoint root (verifies every complete one)"
    )


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every checked checkpoint matches its checksums, 1 naming the first bad file otherwise."""
    bad = 0
    for path, files, problems, seconds in verify_checkpoints(args.dir):
        if files is None:
            print(f"{path}: no checksums recorded (saved by an older megatron-align): not verified")
        elif problems:
            bad += 1
            print(f"{path}: BAD: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                  file=sys.stderr)
        else:
            size = sum(f["size"] for f in files.values())
            print(f"{path}: ok ({len(files)} files, {size / 1e6:.1f} MB, {seconds:.1f} s)")
    return 1 if bad else 0
