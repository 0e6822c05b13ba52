"""The optional ``slurm:`` section: job-script settings for ``megatron-align slurm render``
(:mod:`megatron_align.slurm`). Not the corpus pipeline's SLURM executor settings (``PipelineSlurmConfig``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_align.errors import ConfigError

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass
class SlurmConfig:
    """Optional ``slurm:`` section of a run config; every field can also be given as a render flag."""

    gpus_per_node: int = 8
    """GPUs (= ranks) per node; 0 = CPU-only nodes (all ranks on one node, no GPU request)."""
    time: str = ""
    """Wall-clock limit, SLURM format (``HH:MM:SS`` or ``D-HH:MM:SS``); empty = the template's."""
    partition: str = ""
    """Partition to submit to; empty = the cluster's default."""
    account: str = ""
    """Account to charge; empty = the user's default."""
    job_name: str = ""
    """Job name; empty = ``ma-<basename of run_dir>``."""
    container_image: str = ""
    """Image for pyxis ``srun --container-image`` (e.g. a .sqsh built from docker/); empty = host."""
    container_mounts: str = ""
    """Extra pyxis mounts ``SRC:DST[,SRC:DST]``; the repository is always mounted."""
    exclude_file: str = "preflight/exclude_nodes.txt"
    """Preflight exclude list (relative paths: to the repository); listed nodes become ``--exclude``."""

    def __post_init__(self) -> None:
        if self.gpus_per_node < 0:
            raise ConfigError(f"slurm.gpus_per_node: must be >= 0 (0 = CPU nodes), got {self.gpus_per_node}")
        if self.time and not _TIME.match(self.time):
            raise ConfigError(f"slurm.time: {self.time!r} is not a SLURM time limit; use HH:MM:SS or D-HH:MM:SS")
