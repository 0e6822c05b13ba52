"""`megatron-align launch CONFIG.yaml [key=value ...]`: train under the restart manager.

Parses the arguments and hands the run to :func:`megatron_align.resilience.supervisor.supervisor.supervise`.
Started inside a torchrun/srun step it supervises nothing and runs as one rank, as `train` would.
"""

from __future__ import annotations

import argparse
import sys

from megatron_align.config import load_config
from megatron_align.parallel.spawn import distributed_env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (as for `megatron-align train`)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. resilience.supervisor.max_restarts=3")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)  # a bad config fails here: exit 2, nothing started
    if distributed_env() is not None:
        print("megatron-align launch: started inside a torchrun/srun step: running as a rank like `train`; "
              "run `launch` outside srun (in the batch script) to get restarts", file=sys.stderr)
        from megatron_align.training import launch

        return launch.run(args)
    from megatron_align.resilience.supervisor.supervisor import supervise

    return supervise(config, args.config, list(args.overrides))
