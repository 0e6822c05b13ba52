"""Who is who, and small collectives for the detectors (shared by straggler and health checks).

A verdict is only useful if it names a machine: every report carries the global rank,
the hostname and the local GPU index. :func:`gather_rank_infos` collects those once per
process (one ``all_gather_object`` at train start). The detectors exchange numbers with
:func:`all_gather_tensor`: one small tensor per rank, on the GPU when the backend is NCCL
(NCCL only moves CUDA tensors), on the CPU for gloo.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from megatron_align.resilience.protocol.exclude_nodes import node_name


@dataclass(frozen=True)
class RankInfo:
    rank: int
    hostname: str
    """The node as the scheduler names it (SLURMD_NODENAME under SLURM, else the hostname): what exclude lists hold."""
    local_rank: int
    """LOCAL_RANK / SLURM_LOCALID: the rank's index on its node."""
    gpu: int | None
    """CUDA device index in this process (None on CPU)."""
    pipeline_rank: int
    """Pipeline stage: ranks of the same stage do the same work, so only they are compared."""

    def describe(self) -> str:
        gpu = f"GPU {self.gpu}" if self.gpu is not None else "CPU"
        return f"rank {self.rank} ({self.hostname}, local rank {self.local_rank}, {gpu})"

    def as_dict(self) -> dict:
        return asdict(self)


def local_rank_from_env(environ=os.environ) -> int:
    return int(environ.get("LOCAL_RANK", environ.get("SLURM_LOCALID", 0)))


def this_rank_info() -> RankInfo:
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    return RankInfo(rank=dist.get_rank(), hostname=node_name(), local_rank=local_rank_from_env(),
                    gpu=torch.cuda.current_device() if torch.cuda.is_available() else None, pipeline_rank=pp)


def gather_rank_infos() -> list[RankInfo]:
    """Every rank's :class:`RankInfo`, indexed by global rank (collective)."""
    infos: list = [None] * dist.get_world_size()
    dist.all_gather_object(infos, this_rank_info())
    return infos


def collective_device(group=None) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_gather_tensor(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """[group size, *tensor.shape] on the CPU: every member's ``tensor`` (collective over ``group``)."""
    device = collective_device(group)
    local = tensor.detach().to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts).cpu()


def group_ranks(group=None) -> list[int]:
    """Global ranks of ``group``'s members in group order."""
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
