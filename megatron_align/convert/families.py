"""The Hugging Face model families the converter reads and writes: Llama, Mistral, Qwen2, Qwen3.

All four are the same decoder (RMSNorm, SwiGLU, rotate-half RoPE, GQA) and
share one tensor mapping (:mod:`.mapping`, the engine). A family only says
which optional pieces it has and how its ``config.json`` spells them:

=========  ======================  ==========================  =========================
family     architecture            extra tensors               Megatron-Core option
=========  ======================  ==========================  =========================
llama      LlamaForCausalLM        --                          rope_scaling (llama3)
mistral    MistralForCausalLM      --                          --
qwen2      Qwen2ForCausalLM        q/k/v_proj.bias             add_qkv_bias
qwen3      Qwen3ForCausalLM        q_norm / k_norm (per head)  qk_layernorm
=========  ======================  ==========================  =========================

Any family may have a head dim other than hidden / heads (``config.json``
``head_dim``; Qwen3-0.6B, Mistral-Nemo): that is ``model.kv_channels``
(Megatron-Core's ``kv_channels``), read and written by :mod:`.hf_io`.

Anything these options cannot realise is refused by name: sliding-window
attention, mixture of experts, biases other than Qwen2's q/k/v, RoPE types
other than ``default`` and ``llama3`` (and llama3 low/high frequency factors or
original context other than the 1 / 4 / 8192 Megatron-Core hard-codes).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_align.errors import UserError

# Megatron-Core's RotaryEmbedding._apply_scaling fixes these (0.16 and 0.19 expose only the factor).
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Family:
    name: str
    """model.hf_family."""
    model_type: str
    architecture: str
    qkv_bias: bool
    """q_proj/k_proj/v_proj carry biases (always, for this family)."""
    qk_norm: bool
    """q_norm/k_norm RMSNorm over each head."""


FAMILIES = {f.model_type: f for f in (
    Family("llama", "llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False),
    Family("mistral", "mistral", "MistralForCausalLM", qkv_bias=False, qk_norm=False),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
)}
BY_NAME = {f.name: f for f in FAMILIES.values()}


def family_of(config: dict, where: str) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(
            f"{where}: model_type={model_type!r} is not a Llama-family model (the converter supports "
            f"{', '.join(FAMILIES)}; GPT-NeoX-style parallel-residual and MoE models have no equivalent here)"
        )
    return FAMILIES[model_type]


def _refuse_sliding_windows(config: dict, family: Family, where: str) -> None:
    if family.name in ("qwen2", "qwen3"):  # these configs carry a window size that is off unless use_sliding_window
        if config.get("use_sliding_window"):
            raise UserError(f"{where}: use_sliding_window=true is not supported (full causal attention only)")
    elif config.get("sliding_window") not in (None, 0):
        raise UserError(
            f"{where}: sliding_window={config['sliding_window']} is not supported (full causal attention only)"
        )
    layer_types = config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise UserError(f"{where}: layer_types={sorted(set(layer_types))}: only full_attention layers are supported")


def _rope(config: dict, where: str) -> dict:
    """model.rope_scaling / rope_scaling_factor from rope_scaling (transformers 4) or rope_parameters (5)."""
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "default":
        return {"rope_scaling": "none"}
    if rope_type != "llama3":
        raise UserError(f"{where}: {key}.rope_type={rope_type!r} is not supported (Megatron-Core's GPTModel realises "
                        "only the default RoPE and Llama 3 scaling)")
    for name, value in LLAMA3_FIXED.items():
        if name in rope and float(rope[name]) != value:
            raise UserError(f"{where}: {key}.{name}={rope[name]}: Megatron-Core's llama3 RoPE scaling fixes it at "
                            f"{value:g}; this model cannot be represented")
    if "factor" not in rope:
        raise UserError(f"{where}: {key}.factor: missing for rope_type llama3")
    return {"rope_scaling": "llama3", "rope_scaling_factor": float(rope["factor"])}


def model_features(config: dict, where: str) -> tuple[Family, dict]:
    """(family, the model.* keys beyond the Llama dims) for a config.json; refusals name the key."""
    family = family_of(config, where)
    if config.get("mlp_bias"):
        raise UserError(f"{where}: mlp_bias=true; megatron_align models have no MLP biases")
    if config.get("attention_bias") and not family.qkv_bias:
        raise UserError(
            f"{where}: attention_bias=true; megatron_align models have no biases on o_proj (Megatron-Core's "
            "add_qkv_bias covers q/k/v only, as Qwen2 has), so this checkpoint cannot be represented"
        )
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size"):
        if config.get(key):
            raise UserError(f"{where}: {key}={config[key]} (mixture of experts) is not supported by the converter")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act={config['hidden_act']!r}; only SwiGLU (silu) MLPs are supported")
    _refuse_sliding_windows(config, family, where)
    features = {"hf_family": family.name, "add_qkv_bias": family.qkv_bias, "qk_layernorm": family.qk_norm}
    features.update(_rope(config, where))
    return family, features


def check_exportable(model, where: str) -> Family:
    """The family a checkpoint exports as; refuses features the family's transformers class cannot express."""
    family = BY_NAME[model.hf_family]
    if model.add_qkv_bias != family.qkv_bias:
        raise UserError(f"{where}: model.add_qkv_bias={model.add_qkv_bias} but model.hf_family={family.name} "
                        f"({family.architecture}) {'always has' if family.qkv_bias else 'has no'} q/k/v biases; "
                        "set model.hf_family to qwen2 for q/k/v biases")
    if model.qk_layernorm != family.qk_norm:
        raise UserError(f"{where}: model.qk_layernorm={model.qk_layernorm} but model.hf_family={family.name} "
                        f"({family.architecture}) {'needs' if family.qk_norm else 'has no'} QK norm; "
                        "set model.hf_family to qwen3 for QK norm")
    return family


def config_json(model, base: dict) -> dict:
    """config.json of ``model``'s family from the Llama-layout ``base`` (hf_io.llama_config_json)."""
    family = BY_NAME[model.hf_family]
    out = dict(base, architectures=[family.architecture], model_type=family.model_type)
    theta = base["rope_theta"]
    if model.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": float(model.rope_scaling_factor), **LLAMA3_FIXED}
        out["rope_scaling"] = scaling
        out["rope_parameters"] = {**scaling, "rope_theta": theta}
    if family.name != "llama":
        for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
            out.pop(key, None)
    if family.name == "mistral":
        out["sliding_window"] = None
    if family.name in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=base["num_hidden_layers"],
                   layer_types=["full_attention"] * base["num_hidden_layers"])
    if family.name == "qwen3":
        out["attention_bias"] = False
    return out
