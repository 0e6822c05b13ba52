"""`megatron-align profile summarize RUN_DIR`: per-rank time breakdown of the profiler traces under RUN_DIR/profile."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run dir trained with profile.mode=torch")
    parser.add_argument("--json", action="store_true", help="print the breakdown as JSON (per rank and step)")


def run(args: argparse.Namespace) -> int:
    from megatron_align.training.profiling import format_summary, summarize

    summary = summarize(args.run_dir)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0
