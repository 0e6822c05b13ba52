"""Process-group and Megatron-Core parallel_state set-up for one rank."""

from __future__ import annotations

import datetime
import functools
import random

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_align.config import RootConfig
from megatron_align.parallel.layout import Layout, validate_layout


def init_distributed(config: RootConfig, rank: int, world_size: int, local_rank: int) -> Layout:
    """Validate the layout, form the process groups, seed every RNG. Call once per rank."""
    layout = validate_layout(config, world_size)  # before any process group forms
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:
        from megatron_align.parallel import cpu  # only imported when CUDA is absent

        cpu.activate()
        torch.set_num_threads(
            config.parallel.cpu_threads
        )  # ranks share the cores: oversubscribing makes CPU runs crawl
    backend = config.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(
        backend=backend, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(minutes=config.parallel.timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline if (layout.virtual_pipeline or 1) > 1 else None,
        context_parallel_size=layout.context,
    )
    seed_everything(config.train.seed)
    return layout


def seed_everything(seed: int) -> None:
    # Different pipeline stages hold different layers: give each its own stream (Megatron convention).
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def batch_on_this_cp_rank(batch: dict) -> dict:
    """This context-parallel rank's part of a ``[b, s]`` batch: Megatron-Core's zigzag split (chunks ``r`` and
    ``2 * cp - 1 - r`` of ``2 * cp``), through whichever signature the installed megatron-core has.

    0.16 takes ``(batch, cp_group=None)`` and falls back to parallel_state's group; 0.19 takes
    ``(batch, is_hybrid_cp, cp_group=None)`` and, given no group, splits over the *world* size. So the group is
    always passed.
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    group = parallel_state.get_context_parallel_group()
    if _cp_split_takes_hybrid():
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=group)
    return get_batch_on_this_cp_rank(batch, cp_group=group)


@functools.cache
def _cp_split_takes_hybrid() -> bool:
    """Read once (the split runs every micro-batch): megatron-core >= 0.19's signature."""
    import inspect

    from megatron.core.utils import get_batch_on_this_cp_rank

    return "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters
