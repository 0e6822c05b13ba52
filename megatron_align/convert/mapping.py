"""The one mapping between Megatron-Core GPT checkpoint tensors and Hugging Face Llama tensors.

Both directions go through the *checkpoint key space* of Megatron's
dist_checkpointing: global (layout-independent) tensors such as
``decoder.layers.self_attention.linear_qkv.weight`` of shape
``[num_layers, rows, hidden]``, where the leading axis is the layer. Every
spec (local / te / portable) writes the same keys, and any TP/PP/VPP layout
writes the same global tensors, so one mapping per key serves every checkpoint.

The two layouts that conversions most often get wrong:

* **grouped QKV** — Megatron stores one fused ``linear_qkv`` whose rows are
  grouped per key/value head: for each of the ``num_query_groups`` groups,
  ``heads_per_group`` query heads, then one key head, then one value head
  (``[q x heads_per_group, k, v]``, each ``head_dim`` rows). HF keeps
  ``q_proj`` / ``k_proj`` / ``v_proj`` separate. Both use the same
  non-interleaved ("rotate half") RoPE, so no row permutation inside a head.
* **SwiGLU fc1** — ``linear_fc1`` is ``[gate; up]`` along rows in the global
  tensor (Megatron's swiglu sharded factory re-assembles the per-TP-rank
  halves), i.e. HF ``gate_proj`` then ``up_proj``.

Optional per-family pieces (:mod:`.families`) use the same layouts: the
QKV bias (Qwen2) is grouped exactly like the QKV weight's rows, and the
per-head QK norms (Qwen3) map one to one.

Embedding / output rows beyond the tokenizer's vocabulary are padding (for
TP divisibility) and are trimmed on the way to HF and zero-filled on the way
back.
"""

from __future__ import annotations

import re

import torch

from megatron_align.errors import UserError
from megatron_align.model.arithmetic import ModelShape

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
LAYER_PREFIX = "decoder.layers."

QKV = "self_attention.linear_qkv.weight"
PROJ = "self_attention.linear_proj.weight"
INPUT_NORM = "self_attention.linear_qkv.layer_norm_weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
LAYER_KEYS = (INPUT_NORM, QKV, PROJ, MLP_NORM, FC1, FC2)
QKV_BIAS = "self_attention.linear_qkv.bias"
Q_NORM = "self_attention.q_layernorm.weight"
K_NORM = "self_attention.k_layernorm.weight"
ONE_TO_ONE = {PROJ: "o", FC2: "down", INPUT_NORM: "input_norm", MLP_NORM: "post_norm", Q_NORM: "q_norm",
              K_NORM: "k_norm"}
"""Layer tensors that are one HF tensor each, unchanged (keys of :func:`hf_layer_names`); QKV and FC1 are split."""

# Top-level module names a GPTModel writes; anything else in a checkpoint is optimizer / RNG / callback state.
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")

# Module state-dict names (local spec) -> checkpoint names (Megatron remaps these in sharded_state_dict).
_STATE_DICT_ALIASES = {"input_layernorm.weight": INPUT_NORM, "pre_mlp_layernorm.weight": MLP_NORM}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


# The shapes a conversion needs (from our ModelConfig or an HF config.json): the shared model shape.
LlamaDims = ModelShape


def is_model_key(key: str) -> bool:
    return key.startswith(MODEL_PREFIXES) and "_extra_state" not in key


def layer_key(name: str) -> str:
    """``self_attention.linear_qkv.weight`` -> the stacked checkpoint key."""
    return LAYER_PREFIX + name


def checkpoint_key_of_state_dict_name(name: str) -> tuple[str, int | None] | None:
    """A TP1xPP1 GPTModel ``state_dict()`` name -> (checkpoint key, layer) or None for ``_extra_state``."""
    if "_extra_state" in name:
        return None
    match = _LAYER_NAME.match(name)
    if match is None:
        return name, None
    layer, rest = int(match.group(1)), match.group(2)
    return layer_key(_STATE_DICT_ALIASES.get(rest, rest)), layer


def hf_layer_names(layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    return {"q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight", "v": p + "self_attn.v_proj.weight",
            "o": p + "self_attn.o_proj.weight", "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight",
            "down": p + "mlp.down_proj.weight", "input_norm": p + "input_layernorm.weight",
            "post_norm": p + "post_attention_layernorm.weight", "q_bias": p + "self_attn.q_proj.bias",
            "k_bias": p + "self_attn.k_proj.bias", "v_bias": p + "self_attn.v_proj.bias",
            "q_norm": p + "self_attn.q_norm.weight", "k_norm": p + "self_attn.k_norm.weight"}


def layer_keys(dims: LlamaDims) -> tuple[str, ...]:
    """Per-layer checkpoint names of this model, in HF write order (extras right after the QKV weight)."""
    extras = ((QKV_BIAS,) if dims.qkv_bias else ()) + ((Q_NORM, K_NORM) if dims.qk_norm else ())
    return (QKV,) + extras + (PROJ, FC1, FC2, INPUT_NORM, MLP_NORM)


def hf_names(dims: LlamaDims) -> list[str]:
    """Every HF tensor name of the model, in the order the converter writes them."""
    names = ["model.embed_tokens.weight"]
    for layer in range(dims.num_layers):
        n = hf_layer_names(layer)
        extras = (["q_bias", "k_bias", "v_bias"] if dims.qkv_bias else []) + (
            ["q_norm", "k_norm"] if dims.qk_norm else []
        )
        names += [n[k] for k in ["q", "k", "v", *extras, "o", "gate", "up", "down", "input_norm", "post_norm"]]
    names.append("model.norm.weight")
    if not dims.tie_embeddings:
        names.append("lm_head.weight")
    return names


def hf_shapes(dims: LlamaDims) -> dict[str, tuple[int, ...]]:
    h, f, d = dims.hidden_size, dims.ffn_hidden_size, dims.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (dims.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(dims.num_layers):
        n = hf_layer_names(layer)
        shapes.update(
            {
                n["q"]: (dims.num_attention_heads * d, h),
                n["k"]: (dims.num_query_groups * d, h),
                n["v"]: (dims.num_query_groups * d, h),
                n["o"]: (h, dims.num_attention_heads * d),
                n["gate"]: (f, h),
                n["up"]: (f, h),
                n["down"]: (h, f),
                n["input_norm"]: (h,),
                n["post_norm"]: (h,),
            }
        )
        if dims.qkv_bias:
            shapes.update({n["q_bias"]: (dims.num_attention_heads * d,), n["k_bias"]: (dims.num_query_groups * d,),
                           n["v_bias"]: (dims.num_query_groups * d,)})
        if dims.qk_norm:
            shapes.update({n["q_norm"]: (d,), n["k_norm"]: (d,)})
    if not dims.tie_embeddings:
        shapes["lm_head.weight"] = (dims.vocab_size, h)
    return shapes


# -- Megatron -> HF ----------------------------------------------------------------------------------
def split_qkv(qkv: torch.Tensor, dims: LlamaDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused grouped ``[groups x (q x heads_per_group, k, v) x head_dim, hidden]`` -> q, k, v (a 1-D bias too)."""
    g, hpg, d = dims.num_query_groups, dims.heads_per_group, dims.head_dim
    h = dims.hidden_size if qkv.dim() == 2 else 1
    expected = (g * (hpg + 2) * d, h)[: qkv.dim()]
    if tuple(qkv.shape) != expected:
        raise UserError(
            f"linear_qkv has shape {tuple(qkv.shape)}, expected {expected} for {dims.num_attention_heads} heads "
            f"in {g} query groups of head_dim {d}; the checkpoint does not match its own config"
        )
    grouped = qkv.reshape(g, hpg + 2, d, h)
    q = grouped[:, :hpg].reshape(g * hpg * d, h)
    k = grouped[:, hpg].reshape(g * d, h)
    v = grouped[:, hpg + 1].reshape(g * d, h)
    if qkv.dim() == 1:
        return q.view(-1), k.view(-1), v.view(-1)
    return q, k, v


def layer_to_hf(key: str, tensor: torch.Tensor, layer: int, dims: LlamaDims) -> list[tuple[str, torch.Tensor]]:
    """One layer's slice of a stacked checkpoint tensor -> its HF tensors."""
    n = hf_layer_names(layer)
    name = key[len(LAYER_PREFIX):]
    if name not in layer_keys(dims):
        raise UserError(f"checkpoint tensor {key!r} has no Llama equivalent for this model (q/k/v biases need "
                        "model.add_qkv_bias / Qwen2, QK norms model.qk_layernorm / Qwen3; MoE experts and "
                        "output/MLP biases are not supported by the converter)")
    if name == QKV:
        q, k, v = split_qkv(tensor, dims)
        return [(n["q"], q), (n["k"], k), (n["v"], v)]
    if name == QKV_BIAS:
        q, k, v = split_qkv(tensor, dims)
        return [(n["q_bias"], q), (n["k_bias"], k), (n["v_bias"], v)]
    if name == FC1:
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [(n["gate"], gate), (n["up"], up)]
    if name not in ONE_TO_ONE:
        raise UserError(f"checkpoint tensor {key!r} has no equivalent in the supported families "
                        "(MoE experts, output/MLP biases and other features are not supported by the converter)")
    return [(n[ONE_TO_ONE[name]], tensor)]


def global_to_hf(key: str, tensor: torch.Tensor, dims: LlamaDims) -> list[tuple[str, torch.Tensor]]:
    """A non-layer checkpoint tensor -> HF tensors (vocabulary padding trimmed)."""
    if key == EMBEDDING:
        return [("model.embed_tokens.weight", tensor[: dims.vocab_size])]
    if key == OUTPUT:
        return [] if dims.tie_embeddings else [("lm_head.weight", tensor[: dims.vocab_size])]
    if key == FINAL_NORM:
        return [("model.norm.weight", tensor)]
    raise UserError(f"checkpoint tensor {key!r} has no Llama equivalent (not supported by the converter)")


# -- HF -> Megatron ----------------------------------------------------------------------------------
def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: LlamaDims) -> torch.Tensor:
    g, hpg, d = dims.num_query_groups, dims.heads_per_group, dims.head_dim
    h = dims.hidden_size if q.dim() == 2 else 1
    grouped = torch.cat([q.reshape(g, hpg, d, h), k.reshape(g, 1, d, h), v.reshape(g, 1, d, h)], dim=1)
    return grouped.reshape(g * (hpg + 2) * d, h).reshape((-1,) + tuple(q.shape[1:]))


def megatron_tensor_from_hf(
    key: str, layer: int | None, get, dims: LlamaDims, padded_rows: int | None = None
) -> torch.Tensor:
    """Build one checkpoint tensor (one layer's slice for layer keys) from HF tensors; ``get(name)`` loads one."""
    if layer is not None:
        n = hf_layer_names(layer)
        name = key[len(LAYER_PREFIX):]
        if name == QKV:
            return merge_qkv(get(n["q"]), get(n["k"]), get(n["v"]), dims)
        if name == QKV_BIAS:
            return merge_qkv(get(n["q_bias"]), get(n["k_bias"]), get(n["v_bias"]), dims)
        if name == FC1:
            return torch.cat([get(n["gate"]), get(n["up"])], dim=0)
        if name not in ONE_TO_ONE:
            raise UserError(f"the Megatron model has a tensor {key!r} that HF Llama has no equivalent for")
        return get(n[ONE_TO_ONE[name]])
    if key in (EMBEDDING, OUTPUT):
        source = "model.embed_tokens.weight" if key == EMBEDDING or dims.tie_embeddings else "lm_head.weight"
        rows = get(source)
        if padded_rows is not None and padded_rows > rows.shape[0]:
            pad = torch.zeros(padded_rows - rows.shape[0], rows.shape[1], dtype=rows.dtype)
            rows = torch.cat([rows, pad], dim=0)
        return rows
    if key == FINAL_NORM:
        return get("model.norm.weight")
    raise UserError(f"the Megatron model has a tensor {key!r} that HF Llama has no equivalent for")
