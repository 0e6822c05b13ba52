"""Our configs -> Megatron-Core's DDP, optimizer and LR-scheduler arguments, in one place.

The trainer builds ``DistributedDataParallel``, ``get_megatron_optimizer`` and
``OptimizerParamScheduler`` from what this module returns; every key of ``optimizer:`` (and the
DDP settings that follow from the machine) is translated here and nowhere else:

- ``auto | true | false`` settings are resolved once, by :func:`tristate` (``auto`` = on with CUDA);
- the DDP config follows the device: overlapped grad reduce and Megatron-Core's default buckets on
  CUDA, one big bucket and no overlap on CPU/gloo (nothing to overlap with);
- the LR schedule (warmup, decay, the WSD final decay's default: a named fraction of ``decay_steps``,
  :data:`~megatron_align.training.schedule.WSD_DEFAULT_DECAY_DIVISOR`) is validated and resolved by
  :mod:`megatron_align.training.schedule`, torch-free, so that config load can check it too;
- weight decay is constant (``start_wd == end_wd``), as ``optimizer.weight_decay`` says.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

from megatron_align.config.schema import OptimizerConfig, RootConfig
from megatron_align.errors import UserError
from megatron_align.model.fp8 import fp8_ddp_kwargs
from megatron_align.training.schedule import resolve_schedule

CPU_BUCKET_SIZE = 10**9
"""Gradient bucket size (elements) on CPU: one bucket for the whole model (no overlap to gain)."""


def tristate(value: str, auto: bool) -> bool:
    """An ``auto | true | false`` config value (already normalised by the schema) as a bool; ``auto`` -> ``auto``."""
    return {"auto": auto, "true": True, "false": False}[value]


def use_distributed_optimizer(config: RootConfig, cuda: bool) -> bool:
    """``optimizer.distributed`` resolved: auto = on with CUDA; true without CUDA is a user error."""
    on = tristate(config.optimizer.distributed, cuda)
    if on and not cuda:
        raise UserError("optimizer.distributed=true needs CUDA (Megatron-Core's DistributedOptimizer); use false or auto on CPU")
    return on


def ddp_config(config: RootConfig, cuda: bool, distributed_optimizer: bool) -> DistributedDataParallelConfig:
    """Megatron-Core's DDP config: fp32 grad reduction; overlap and default buckets on CUDA only."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cuda, overlap_param_gather=False,
        use_distributed_optimizer=distributed_optimizer, check_for_nan_in_grad=False,
        bucket_size=None if cuda else CPU_BUCKET_SIZE, **fp8_ddp_kwargs(config))


def optimizer_config(o: OptimizerConfig, precision: str, params_dtype: torch.dtype,
                     distributed_optimizer: bool) -> MegatronOptimizerConfig:
    """Megatron-Core's optimizer config: AdamW with our betas, eps, clipping and weight decay."""
    return MegatronOptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=precision == "bf16", params_dtype=params_dtype, use_distributed_optimizer=distributed_optimizer)


def scheduler_kwargs(config: RootConfig) -> dict[str, Any]:
    """Keyword arguments of Megatron-Core's ``OptimizerParamScheduler`` (after the optimizer): the
    schedule :func:`megatron_align.training.schedule.resolve_schedule` validates and resolves."""
    return resolve_schedule(config.optimizer, config.train.steps)[0]
