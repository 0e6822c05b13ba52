"""`megatron-align doctor [CONFIG] [--json]`: what this machine can run, and whether it can run CONFIG.

The report and the checks are :mod:`megatron_align.doctor`. Exit codes: 0 = fine; 1 = an unmet need of CONFIG, or an
unhealthy GPU; 2 = unreadable config.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from megatron_align.doctor import check_config, collect, format_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", help="YAML run config: exit 1 listing what it needs that this machine lacks"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.config:
        check_config(report, args.config)
    if args.json:
        data = asdict(report)
        data["healthy"] = report.healthy
        data["ok"] = report.healthy and not report.unmet
        print(json.dumps(data, indent=2))
    else:
        print(format_text(report, args.config))
    if report.unmet or not report.healthy:
        if not args.json:
            print("doctor: not ready (see above)", file=sys.stderr)
        return 1
    return 0
