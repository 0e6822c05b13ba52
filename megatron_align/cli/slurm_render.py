"""`megatron-align slurm render CONFIG`: print (or write, mode 755) slurm/pretrain.sbatch with its #SBATCH directives
set for a config (:func:`megatron_align.slurm.render_job_script`)."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_align.fileio import atomic_open
from megatron_align.slurm import render_job_script


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config")
    parser.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node (default: slurm.gpus_per_node or 8; 0 = CPU nodes)"
    )
    parser.add_argument("--time", help="time limit, e.g. 2-00:00:00 (default: slurm.time or the template's)")
    parser.add_argument("--partition", help="partition (default: slurm.partition)")
    parser.add_argument("--account", help="account (default: slurm.account)")
    parser.add_argument("--job-name", help="job name (default: slurm.job_name or ma-<run_dir name>)")
    parser.add_argument("--container-image", help="pyxis image (default: slurm.container_image; empty = host)")
    parser.add_argument("--exclude-file", help="preflight exclude file (default: slurm.exclude_file)")
    parser.add_argument(
        "--verb", choices=["launch", "train"], help="megatron-align verb the job runs (default: the template's)"
    )
    parser.add_argument("--template", help="job script template (default: slurm/pretrain.sbatch of this checkout)")
    parser.add_argument("-o", "--output", help="write the script here (mode 755) instead of stdout")


def run(args: argparse.Namespace) -> int:
    flags = {key: getattr(args, key) for key in ("gpus_per_node", "time", "partition", "account", "job_name",
                                                 "container_image", "exclude_file")}
    text, nodes, tasks_per_node = render_job_script(args.config, flags, args.template, args.verb)
    if args.output:
        with atomic_open(args.output) as f:
            f.write(text)
            os.fchmod(f.fileno(), 0o755)
        print(f"wrote {args.output}: {nodes} node(s) x {tasks_per_node} task(s)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
