"""The trainer's side of Megatron-LM checkpoints: resume from one, and write ours in its envelope.

Reading (``checkpoint.load`` names a Megatron-LM / Bridge directory): the model section is the checkpoint's
(:func:`adopt_model_config`, before any rank starts); weights always load, resharded to this run's TP/PP by
dist_checkpointing; optimizer state, LR-schedule position and iteration load with ``checkpoint.load_optimizer``;
RNG state when TP and PP match. The data position is deliberate: Megatron-LM's ``consumed_train_samples``
counts samples of *its* data, so this run's mixture starts at sample 0 unless ``checkpoint.data_position=continue``.

Writing (``checkpoint.format=megatron_lm``): the same shards plus what Megatron-LM's ``load_checkpoint`` reads:
``args`` (built on megatron.training.arguments' own defaults where that package exists), ``iteration``,
``checkpoint_version``, ``opt_param_scheduler`` in samples, ``rng_state`` as a ShardedObject over (pp, tp) with
replica id dp x cp, ``num_floating_point_operations_so_far``, ``content_metadata``, and the
``latest_checkpointed_iteration.txt`` tracker. Our marker, checksums and atomic commit stay as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_align.convert import megatron_lm as mlm
from megatron_align.errors import ConfigError, UserError
from megatron_align.model.builder import resolve_spec
from megatron_align.training.optim import (
    load_optimizer_state,
    optimizer_checkpoint_metadata,
    prepare_load_template,
)

log = logging.getLogger(__name__)


def adopt_model_config(config):
    """``config`` with ``model`` taken from a Megatron-LM ``checkpoint.load`` (logged); unchanged otherwise."""
    load = config.checkpoint.load
    if not mlm.is_megatron_lm(load):
        return config

    ckpt = mlm.open_checkpoint(load)
    derived = mlm.model_config(ckpt)
    tensor = config.parallel.tensor
    if derived["vocab_size"] % tensor:
        raise ConfigError(f"parallel.tensor={tensor} does not divide the {derived['vocab_size']} embedding rows of "
                          f"{ckpt.path}; pick a tensor-parallel size that does")
    current = dataclasses.asdict(config.model)
    changed = {k: (current.get(k), v) for k, v in derived.items() if current.get(k) != v}
    model = dataclasses.replace(config.model, **derived)
    log.info("model config from Megatron checkpoint %s: %s", ckpt.path,
             ", ".join(f"model.{k}={new} (config had {old})" for k, (old, new) in changed.items()) or "unchanged")
    return dataclasses.replace(config, model=model)


def sharded_metadata(trainer) -> dict:
    """Metadata for model/optimizer ``sharded_state_dict`` as Megatron-LM builds it (with this run's dp x cp group)."""
    # The DistributedOptimizer's format is ours (dp_reshardable), which is also Megatron-LM's default since
    # megatron-core 0.13: its load_checkpoint builds the same template from content_metadata.
    metadata = {**mlm.CONTENT_METADATA, **(optimizer_checkpoint_metadata(trainer.use_dist_opt) or {})}
    metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return metadata


def rng_object(trainer, states: list[dict]) -> ShardedObject:
    """Megatron-LM's rng_state layout: (pp, tp) shards, replicas over dp x cp."""
    return ShardedObject(
        "rng_state", states, (trainer.layout.pipeline, trainer.layout.tensor),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def build_args(trainer) -> argparse.Namespace:
    """The ``args`` Megatron-LM needs to rebuild this model and continue this schedule."""
    try:
        from megatron.training.arguments import add_megatron_arguments

        args = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args([])
    except ImportError:  # megatron-core < 0.17 ships no megatron.training: our fields only
        args = argparse.Namespace()
    config, layout = trainer.config, trainer.layout
    m, o, t = config.model, config.optimizer, config.train
    schedule = trainer._schedule
    dtype = trainer.transformer_config.params_dtype
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    values = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_size, num_attention_heads=heads,
        group_query_attention=groups != heads, num_query_groups=groups, kv_channels=m.head_dim,
        seq_length=m.seq_length, max_position_embeddings=m.seq_length, position_embedding_type="rope",
        use_rotary_position_embeddings=True, add_position_embedding=False, rotary_base=m.rotary_base,
        rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=m.rope_scaling == "llama3",
        rope_scaling_factor=m.rope_scaling_factor, normalization="RMSNorm", norm_epsilon=m.norm_epsilon,
        swiglu=True, squared_relu=False, add_bias_linear=False, add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm, untie_embeddings_and_output_weights=not m.tie_embeddings,
        apply_layernorm_1p=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.init_method_std,
        num_experts=None, multi_latent_attention=False,
        vocab_size=trainer.vocab_size, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        padded_vocab_size=trainer.padded_vocab_size,
        tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
        context_parallel_size=layout.context, data_parallel_size=layout.data, world_size=layout.world_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline if (layout.virtual_pipeline or 1) > 1 else None,
        sequence_parallel=config.parallel.sequence_parallel,
        micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size, train_iters=t.steps, seed=t.seed,
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, lr_decay_style=o.decay_style, lr_warmup_iters=schedule[
            "lr_warmup_steps"], lr_warmup_fraction=None, lr_warmup_init=0.0, lr_decay_iters=schedule["lr_decay_steps"],
        lr_wsd_decay_iters=schedule.get("wsd_decay_steps"), lr_wsd_decay_style=o.wsd_decay_style,
        weight_decay=o.weight_decay, start_weight_decay=o.weight_decay, end_weight_decay=o.weight_decay,
        weight_decay_incr_style="constant", adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16, fp16=False, params_dtype=dtype,
        use_distributed_optimizer=trainer.use_dist_opt, ckpt_format="torch_dist",
        iteration=trainer.step, consumed_train_samples=trainer.consumed_samples, skipped_train_samples=0,
        consumed_valid_samples=0, no_save_optim=False, no_save_rng=False,
        transformer_impl="transformer_engine" if resolve_spec(config) == "te" else "local",
    )
    for key, value in values.items():
        setattr(args, key, value)
    return args


def envelope(trainer) -> dict:
    """The common entries Megatron-LM's load_checkpoint reads (beside our own step / scheduler / callbacks)."""
    gbs = trainer.config.train.global_batch_size
    return {
        "args": build_args(trainer), "iteration": trainer.step, "checkpoint_version": mlm.CHECKPOINT_VERSION,
        "opt_param_scheduler": mlm.scheduler_to_samples(trainer.scheduler.state_dict(), gbs),
        "num_floating_point_operations_so_far": float(trainer.flops_per_step * trainer.step),
        "content_metadata": {k: v for k, v in sharded_metadata(trainer).items() if k != "dp_cp_group"},
    }


def _check_shards(path: str) -> None:
    """Missing or truncated shard files named before dist_checkpointing reads them (no checksums to verify)."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_align.convert.dist_reader import check_shard_sizes

    check_shard_sizes(path, FileSystemReader(path).read_metadata())


def load(trainer, path: str) -> None:
    """Resume ``trainer`` from Megatron-LM / Bridge checkpoint ``path`` (collective; see the module docstring)."""
    from megatron_align.training.checkpoint import load_sharded

    ckpt = mlm.open_checkpoint(path)
    cfg = trainer.config.checkpoint
    _check_shards(ckpt.path)
    content = dict(ckpt.common.get("content_metadata") or {})
    sharding = mlm.optimizer_sharding(ckpt)
    if sharding is not None:
        content["distrib_optim_sharding_type"] = sharding
    metadata = dict(content, dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    saved_tp_pp = (ckpt.arg("tensor_model_parallel_size", 1), ckpt.arg("pipeline_model_parallel_size", 1))
    run_tp_pp = (trainer.layout.tensor, trainer.layout.pipeline)
    with_optimizer = cfg.load_optimizer and not ckpt.release and "opt_param_scheduler" in ckpt.common
    fresh = "or set checkpoint.load_optimizer=false to start the optimizer fresh from these weights"
    if with_optimizer:
        from megatron.core.optimizer import distrib_optimizer

        refusal = mlm.optimizer_refusal(sharding, saved_tp_pp, run_tp_pp, trainer.use_dist_opt,
                                        distrib_optimizer.HAVE_APEX_OR_TE)
        if refusal:
            raise UserError(f"{ckpt.path}: {refusal}; {fresh}")
    with_rng = with_optimizer and saved_tp_pp == run_tp_pp
    state: dict = {}
    for i, m in enumerate(trainer.model):
        state["model" if len(trainer.model) == 1 else f"model{i}"] = m.module.sharded_state_dict(metadata=metadata)
    if with_optimizer:
        prepare_load_template(trainer.optimizer)
        state["optimizer"] = trainer.optimizer.sharded_state_dict(state, is_loading=True, metadata=metadata)
        mismatch = mlm.layout_mismatch(ckpt.path, state["optimizer"])
        if mismatch:
            raise UserError(f"{ckpt.path}: its optimizer state does not fit this run's optimizer ({mismatch}: the "
                            "DistributedOptimizer's buckets follow the DDP bucket size and the model's layout); "
                            f"{fresh}")
    if with_rng:
        state["rng_state"] = rng_object(trainer, mlm.rng_to_megatron_lm(trainer._rng_state()))
    loaded = load_sharded(ckpt.path, state)
    for i, m in enumerate(trainer.model):
        m.module.load_state_dict(loaded["model" if len(trainer.model) == 1 else f"model{i}"])
    if not with_optimizer:
        log.info("loaded weights from Megatron checkpoint %s (iteration %d); optimizer, schedule and data position "
                 "start fresh", ckpt.path, ckpt.iteration)
        return
    load_optimizer_state(trainer.optimizer, loaded["optimizer"])
    gbs = int(ckpt.arg("global_batch_size") or trainer.config.train.global_batch_size)
    trainer._load_scheduler(mlm.scheduler_to_steps(ckpt.common["opt_param_scheduler"], gbs), ckpt.path)
    if with_rng:
        dp_rank = parallel_state.get_data_parallel_rank()
        trainer._set_rng_state(mlm.rng_from_megatron_lm(loaded["rng_state"], dp_rank))
    else:
        log.warning("Megatron checkpoint TP/PP %s differs from this run's: RNG states reseeded", saved_tp_pp)
    trainer.step = ckpt.iteration
    continue_data = cfg.data_position == "continue"
    trainer.consumed_samples = ckpt.consumed_samples if continue_data else 0
    trainer.metrics.truncate_after(trainer.step)
    log.info("resumed from Megatron checkpoint %s at iteration %d; Megatron consumed %d samples of its own data; "
             "this run's data starts at sample %d (checkpoint.data_position=%s)", ckpt.path, trainer.step,
             ckpt.consumed_samples, trainer.consumed_samples, cfg.data_position)
