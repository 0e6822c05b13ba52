"""The TP x PP x CP x DP layout: checked before any process group forms.

Data-parallel size is derived: dp = world / (tp * pp * cp). Every constraint
that Megatron-Core would otherwise hit deep inside initialisation (or, worse,
silently mis-shard) is checked here and reported with the numbers involved.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_align.config import RootConfig
from megatron_align.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor: int
    pipeline: int
    context: int
    virtual_pipeline: int | None
    data: int


def validate_layout(config: RootConfig, world_size: int) -> Layout:
    """Every check that needs the world size (plus run-level ones), before any process group forms."""
    config.data.require_sources()
    p, m, t = config.parallel, config.model, config.train
    tp, pp, cp = p.tensor, p.pipeline, p.context
    vpp = p.virtual_pipeline or 1
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x parallel.context "
            f"= {tp} x {pp} x {cp} = {model_parallel}; change the layout or the number of ranks")
    dp = world_size // model_parallel
    if m.num_attention_heads % tp:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor={tp}")
    groups = m.num_query_groups or m.num_attention_heads
    if groups % tp:
        raise ConfigError(f"model.num_query_groups={groups} is not divisible by parallel.tensor={tp}")
    if m.ffn_size % tp:
        raise ConfigError(f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tensor={tp}")
    if m.num_layers % (pp * vpp):
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline x parallel.virtual_pipeline "
            f"= {pp} x {vpp} = {pp * vpp}"
        )
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            "train.micro_batch_size x data-parallel size "
            f"= {t.micro_batch_size} x {dp} = {t.micro_batch_size * dp} "
            f"(data-parallel size = world {world_size} / (tp {tp} x pp {pp} x cp {cp}))"
        )
    if vpp > 1 and (t.global_batch_size // (t.micro_batch_size * dp)) % pp:
        raise ConfigError(
            f"interleaved pipeline (parallel.virtual_pipeline={vpp}) needs the number of microbatches "
            f"{t.global_batch_size // (t.micro_batch_size * dp)} to be a multiple of parallel.pipeline={pp}")
    if cp > 1 and m.seq_length % (2 * cp):
        raise ConfigError(f"model.seq_length={m.seq_length} must be divisible by 2 x parallel.context = {2 * cp}")
    return Layout(
        world_size=world_size, tensor=tp, pipeline=pp, context=cp, virtual_pipeline=p.virtual_pipeline, data=dp
    )
