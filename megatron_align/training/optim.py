"""Our configs -> Megatron-Core's DDP, optimizer and LR-scheduler arguments, in one place.

The trainer builds ``DistributedDataParallel``, ``get_megatron_optimizer`` and
``OptimizerParamScheduler`` from what this module returns; every key of ``optimizer:`` (and the
DDP settings that follow from the machine) is translated here and nowhere else:

- ``auto | true | false`` settings are resolved once, by :func:`tristate` (``auto`` = on with CUDA);
- the DDP config follows the device: overlapped grad reduce and Megatron-Core's default buckets on
  CUDA, one big bucket and no overlap on CPU/gloo (nothing to overlap with);
- the WSD schedule's final decay defaults to a named fraction of ``decay_steps``
  (:data:`WSD_DEFAULT_DECAY_DIVISOR`, :func:`wsd_decay_steps`);
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

WSD_DEFAULT_DECAY_DIVISOR = 10
"""WSD without ``optimizer.wsd_decay_steps``: the final decay is the last 1/10 of ``decay_steps``
(floor division, at least one step) -- the "short cooldown" of warmup-stable-decay schedules, and
the ``default 10% of decay_steps`` the config documents."""

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


def decay_steps(config: RootConfig) -> int:
    """``optimizer.decay_steps``, default ``train.steps`` (the LR reaches ``min_lr`` at the last step)."""
    return config.optimizer.decay_steps or config.train.steps


def wsd_decay_steps(o: OptimizerConfig, total_decay_steps: int) -> int | None:
    """Length of WSD's final decay: ``optimizer.wsd_decay_steps`` if set, else
    ``max(1, total_decay_steps // WSD_DEFAULT_DECAY_DIVISOR)``; None for every other decay style."""
    if o.decay_style != "WSD":
        return None
    return o.wsd_decay_steps or max(1, total_decay_steps // WSD_DEFAULT_DECAY_DIVISOR)


def scheduler_kwargs(config: RootConfig) -> dict[str, Any]:
    """Keyword arguments of Megatron-Core's ``OptimizerParamScheduler`` (after the optimizer)."""
    o = config.optimizer
    steps = decay_steps(config)
    return dict(init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
                lr_decay_steps=steps, lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
                wd_incr_steps=steps, wd_incr_style="constant", wsd_decay_steps=wsd_decay_steps(o, steps),
                lr_wsd_decay_style=o.wsd_decay_style if o.decay_style == "WSD" else None)
