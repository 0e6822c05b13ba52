"""Our config -> Megatron-Core ``TransformerConfig`` + ``GPTModel`` chunks.

This is the one adapter between megatron_align's dataclasses and Megatron-Core (it builds on Megatron-Core's
config and model and copies none of its code). The model is Llama-style: RMSNorm, SwiGLU, RoPE, GQA, no biases,
plus the features open base models add, each one of Megatron-Core's own options: ``model.rope_scaling=llama3``
(GPTModel ``rope_scaling``), ``add_qkv_bias`` (Qwen2), ``qk_layernorm`` (Qwen3) and ``kv_channels`` (a head dim
other than hidden / heads, as in Qwen3-0.6B or Mistral-Nemo). ``model.spec`` picks the layer implementation
(Spec seam): ``local`` is pure Megatron-Core (runs anywhere), ``portable`` is ``local`` with PyTorch
SDPA core attention (:mod:`megatron_align.model.portable`), ``te`` is
Megatron-Core's Transformer Engine spec. All produce the same parameter /
sharded-state keys for the weights, so checkpoints move between them (te adds
TE's ``_extra_state`` FP8 scaling objects). ``precision=fp8`` is bf16 weights
plus FP8 GEMMs in TE: :mod:`megatron_align.model.fp8` maps and checks it.

Megatron-Core 0.19 deprecates ``GPTModel`` for ``HybridModel`` and logs a warning per chunk. We keep
``GPTModel`` on purpose (docs/megatron_core_versions.md: the plan, and what would force the move),
so that one warning is replaced by one line of ours; every other Megatron warning still shows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from megatron_align.config import RootConfig
from megatron_align.errors import ConfigError, refused_by_megatron
from megatron_align.known_warnings import drop_known_record
from megatron_align.model.fp8 import FP8Environment, fp8_transformer_kwargs, validate_fp8
from megatron_align.optional import have_grad_accum_fusion_kernel, have_te

GPT_DEPRECATION = "GPTModel IS DEPRECATED"
drop_known_record("megatron.core.models.gpt.gpt_model", GPT_DEPRECATION,
                  "megatron-core deprecates GPTModel for HybridModel; megatron_align keeps GPTModel for now "
                  "(checkpoints stay loadable on 0.16 and 0.19): see docs/megatron_core_versions.md")


def resolve_precision(config: RootConfig, fp8_env: FP8Environment | None = None) -> str:
    """The dtype of weights and optimizer: auto -> bf16 with CUDA, fp32 on CPU; bf16 on CPU is refused (slow
    and not what the CPU path tests). fp8 -> bf16 after the FP8 checks (FP8 is a GEMM mode on bf16 weights);
    ``fp8_env`` replaces probing this machine (tests)."""
    if config.precision == "fp8":
        validate_fp8(config, fp8_env)
        return "bf16"
    if config.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if config.precision == "bf16" and not torch.cuda.is_available():
        raise ConfigError("precision=bf16 needs CUDA; on CPU use precision=fp32 (or auto)")
    return config.precision


def resolve_spec(config: RootConfig, fp8_env: FP8Environment | None = None) -> str:
    spec = config.model.spec
    if config.precision == "fp8":
        validate_fp8(config, fp8_env)  # refuses local/portable and a machine without TE
        return "te"
    if spec == "auto":
        return "te" if (torch.cuda.is_available() and have_te()) else "local"
    if spec == "te" and not have_te():
        raise ConfigError("model.spec=te but Transformer Engine is not importable here; use model.spec=local "
                          "(or auto), or run in the docker/ image which ships TE")
    if spec == "te" and not torch.cuda.is_available():
        raise ConfigError("model.spec=te needs CUDA; use model.spec=local on CPU")
    return spec


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def build_transformer_config(config: RootConfig, fp8_env: FP8Environment | None = None) -> TransformerConfig:
    m, p = config.model, config.parallel
    precision = resolve_precision(config, fp8_env)
    on_gpu = torch.cuda.is_available()
    spec = resolve_spec(config, fp8_env)
    if p.context > 1 and spec != "te":
        raise ConfigError(
            "parallel.context > 1 needs model.spec=te (Megatron-Core's local attention has no context parallelism)"
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    recompute = {}
    if m.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif m.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    fused = on_gpu and spec == "te"
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline if (p.virtual_pipeline or 1) > 1 else None,
        context_parallel_size=p.context,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        persist_layer_norm=fused,
        apply_rope_fusion=fused,
        gradient_accumulation_fusion=fused and have_grad_accum_fusion_kernel(),
        deallocate_pipeline_outputs=True,
        **recompute,
        **fp8_transformer_kwargs(config),
    )


def layer_spec(config: RootConfig):
    spec = resolve_spec(config)
    if spec == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.model.qk_layernorm)
    if spec == "portable":
        from megatron_align.model.portable import get_gpt_layer_portable_spec

        return get_gpt_layer_portable_spec(qk_layernorm=config.model.qk_layernorm)
    return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.model.qk_layernorm)


def build_model_chunks(config: RootConfig, vocab_size: int) -> list[GPTModel]:
    """One GPTModel per virtual-pipeline chunk of this rank (parallel_state must be initialised)."""
    with refused_by_megatron("the model and parallel settings"):
        tconfig = build_transformer_config(config)
    spec = layer_spec(config)
    vpp = config.parallel.virtual_pipeline or 1
    padded = padded_vocab_size(vocab_size, config.model.make_vocab_size_divisible_by, config.parallel.tensor)
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        chunk = GPTModel(
            config=tconfig,
            transformer_layer_spec=spec,
            vocab_size=padded,
            max_sequence_length=config.model.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=config.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=config.model.rotary_base,
            rope_scaling=config.model.rope_scaling == "llama3",
            rope_scaling_factor=config.model.rope_scaling_factor,
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


def count_parameters(chunks) -> int:
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())
