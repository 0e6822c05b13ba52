"""Our configs -> Megatron-Core's DDP, optimizer and LR-scheduler arguments, in one place.

The trainer builds ``DistributedDataParallel``, ``get_megatron_optimizer`` and
``OptimizerParamScheduler`` from what this module returns; every key of ``optimizer:`` (and the
DDP settings that follow from the machine) is translated here and nowhere else:

- ``auto | true | false`` settings are resolved once, by ``config.checks.resolve_tristate`` (``auto`` = on with CUDA);
- the DDP config follows the device: overlapped grad reduce and Megatron-Core's default buckets on
  CUDA, one big bucket and no overlap on CPU/gloo (nothing to overlap with);
- the LR schedule (warmup, decay, the WSD final decay's default: a named fraction of ``decay_steps``,
  :data:`~megatron_align.config.schedule.WSD_DEFAULT_DECAY_DIVISOR`) is validated and resolved by
  :mod:`megatron_align.config.schedule`, torch-free, so that config load can check it too;
- weight decay is constant (``start_wd == end_wd``), as ``optimizer.weight_decay`` says;
- the DistributedOptimizer's checkpoint format and the two steps around its load
  (:func:`prepare_load_template`, :func:`load_optimizer_state`) that make resume exact without TE/apex.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

from megatron_align.config import OptimizerConfig, RootConfig
from megatron_align.config.checks import resolve_tristate
from megatron_align.config.schedule import resolve_schedule
from megatron_align.model.fp8 import fp8_ddp_kwargs

CPU_BUCKET_SIZE = 10**9
"""Gradient bucket size (elements) on CPU: one bucket for the whole model (no overlap to gain)."""


def use_distributed_optimizer(config: RootConfig, cuda: bool) -> bool:
    """``optimizer.distributed`` resolved: auto = on with CUDA. On CPU/gloo it runs when asked for (true): the
    routing of :mod:`megatron_align.parallel.cpu` covers it, so its checkpoints are tested without a GPU."""
    return resolve_tristate(config.optimizer.distributed, cuda)


DIST_OPT_SHARDING = "dp_reshardable"
"""How the DistributedOptimizer's state is checkpointed (Megatron-LM's default): each rank writes its own shard
of the flat buffers, no gather; a checkpoint reshards across DP sizes, not across TP/PP or another DDP bucket
layout (a CPU checkpoint has one bucket, a GPU one Megatron-Core's default buckets). The alternatives fail here:
Megatron-Core's own default (``fully_sharded_model_space``) is refused by its dist_checkpointing ("flattened_range
is not supported", 0.16 and 0.19), and ``fully_reshardable`` cannot load into torch Adam (``KeyError: 'step'``
in ``_set_main_param_and_optimizer_states``, both versions)."""


def optimizer_checkpoint_metadata(distributed_optimizer: bool) -> dict | None:
    """The ``metadata`` of ``optimizer.sharded_state_dict``: the DistributedOptimizer's checkpoint format."""
    return {"distrib_optim_sharding_type": DIST_OPT_SHARDING} if distributed_optimizer else None


def prepare_load_template(optimizer) -> None:
    """Give a fresh DistributedOptimizer the inner state a load template is built from.

    Without TE/apex Megatron-Core falls back to torch Adam, whose state is empty until the first step; then
    ``sharded_state_dict(is_loading=True)`` fails in ``state_dict()`` (``assert len(steps) == 1``). Megatron-Core
    fills it with one optimizer step on zero gradients (``_init_optimizer_states_with_dummy_values``); with the
    learning rate and weight decay held at 0 for that step no parameter moves, and the load overwrites the state.
    TE's and apex's FusedAdam handle an empty state themselves and are left alone.
    """
    for opt in _torch_adam_distributed_optimizers(optimizer):
        if len(opt.optimizer.state) > 0:
            continue
        groups = opt.optimizer.param_groups
        saved = [(g["lr"], g["weight_decay"]) for g in groups]
        for g in groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        try:
            with warnings.catch_warnings():  # fp32 params: the main params are views, and their .grad is set
                warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
                opt._init_optimizer_states_with_dummy_values()
        finally:
            for g, (lr, wd) in zip(groups, saved):
                g["lr"], g["weight_decay"] = lr, wd


def _torch_adam_distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizers of ``optimizer`` that wrap torch Adam (Megatron-Core found neither TE nor apex)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in chained if isinstance(opt, distrib_optimizer.DistributedOptimizer)]


def load_optimizer_state(optimizer, state) -> None:
    """``optimizer.load_state_dict(state)`` for a state loaded through :func:`prepare_load_template`'s template.

    Under ``no_grad``: with fp32 parameters the DistributedOptimizer's main parameters are views of the
    model's leaf parameters, which an in-place copy under autograd refuses. With torch Adam, the
    ``dp_reshardable`` format keeps Adam's per-parameter ``step`` out of the checkpoint (it lives in the
    param groups) and its load copies the *template's* step back over the restored one, so the step count is
    set again from the checkpoint's param groups (Adam's bias correction depends on it).
    """
    with torch.no_grad():
        optimizer.load_state_dict(state)
    torch_adam = _torch_adam_distributed_optimizers(optimizer)
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(chained) == 1 else [v for _, v in sorted(state.items())] if isinstance(state, dict) \
        else list(state)  # ChainedOptimizer.load_state_dict's own reading
    for opt, part in zip(chained, parts):
        steps = {g["step"] for g in part["optimizer"]["param_groups"] if "step" in g} if opt in torch_adam else ()
        if len(steps) == 1:
            step = torch.tensor(float(steps.pop()), dtype=torch.float32)
            for param_state in opt.optimizer.state.values():
                param_state["step"] = step.clone()


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
    schedule :func:`megatron_align.config.schedule.resolve_schedule` validates and resolves."""
    return resolve_schedule(config.optimizer, config.train.steps)[0]
