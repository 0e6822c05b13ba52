"""Model configs: the transformer's shape and layer implementation (``model:``) and FP8 (``fp8:``).

The FP8 recipes, their version and GPU floors and how scaling state flows through checkpoints are in
docs/fp8.md; :mod:`megatron_align.model.fp8` maps :class:`FP8Config` onto Megatron-Core's fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_align.config.checks import at_least, choice, positive
from megatron_align.errors import ConfigError

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_AMAX_ALGOS = ("max", "most_recent")


@dataclass
class ModelConfig:
    num_layers: int = 2
    """Transformer layers (split over pipeline stages)."""
    hidden_size: int = 64
    """Model width h."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width; default: 8h/3 rounded up to a multiple of 64 (Llama)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for GQA; None = multi-head attention (one group per head)."""
    kv_channels: int | None = None
    """Head dim (Megatron-Core's kv_channels); None = hidden_size / num_attention_heads. Set it where a model's
    heads are wider or narrower than that (Qwen3-0.6B: hidden 1024, 16 heads of 128; Mistral-Nemo: 5120, 32 x 128)."""
    seq_length: int = 128
    """Training sequence length in tokens."""
    vocab_size: int | None = None
    """Tokenizer vocabulary; None = take it from data.tokenizer. Padded for TP (below)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding rows are padded to a multiple of this x parallel.tensor."""
    rotary_base: int = 10000
    """RoPE theta (Llama 3 uses 500000)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    spec: str = "auto"
    """Layer implementation: auto (te on a GPU with Transformer Engine, else local) | local | te |
    portable (torch SDPA)."""
    recompute: str = "none"
    """Activation recompute: none | selective (core attention) | full (whole layers)."""
    rope_scaling: str = "none"
    """RoPE frequency scaling: none | llama3 (Llama 3.1+; Megatron-Core's rope_scaling, low/high frequency factors
    1 and 4 and original context 8192 fixed there)."""
    rope_scaling_factor: float = 8.0
    """model.rope_scaling=llama3: the scaling factor (Llama 3.1: 8, Llama 3.2: 32)."""
    add_qkv_bias: bool = False
    """Biases on the query/key/value projections (Qwen2 / Qwen2.5); Megatron-Core's add_qkv_bias."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3); Megatron-Core's qk_layernorm."""
    hf_family: str = "llama"
    """The Hugging Face architecture `convert to-hf` writes: llama | mistral | qwen2 | qwen3 (`convert from-hf` sets
    it to the family it read). Training ignores it."""

    def __post_init__(self) -> None:
        for key in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "seq_length",
            "make_vocab_size_divisible_by",
            "rotary_base",
        ):
            positive(f"model.{key}", getattr(self, key))
        positive("model.ffn_hidden_size", self.ffn_hidden_size)
        positive("model.num_query_groups", self.num_query_groups)
        positive("model.kv_channels", self.kv_channels)
        positive("model.vocab_size", self.vocab_size)
        positive("model.norm_epsilon", self.norm_epsilon)
        choice("model.spec", self.spec, ("auto", "local", "te", "portable"))
        choice("model.recompute", self.recompute, ("none", "selective", "full"))
        choice("model.rope_scaling", self.rope_scaling, ("none", "llama3"))
        positive("model.rope_scaling_factor", self.rope_scaling_factor)
        choice("model.hf_family", self.hf_family, ("llama", "mistral", "qwen2", "qwen3"))
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by model.num_attention_heads="
                              f"{self.num_attention_heads} (or set model.kv_channels, the head dim)")
        if self.kv_channels is not None and self.kv_channels % 2:
            raise ConfigError(f"model.kv_channels={self.kv_channels}: must be even (RoPE rotates pairs of channels)")
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )

    @property
    def head_dim(self) -> int:
        """kv_channels, or hidden_size / num_attention_heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """ffn_hidden_size, or the Llama default 8h/3 rounded up to a multiple of 64."""
        return self.ffn_hidden_size or -(-(8 * self.hidden_size // 3) // 64) * 64



@dataclass
class FP8Config:
    """Used only when the root ``precision`` is ``fp8``; ignored otherwise."""

    format: str = "hybrid"
    """e4m3 (all tensors) | hybrid (E4M3 weights/activations, E5M2 gradients)."""
    recipe: str = "delayed"
    """Scaling recipe: delayed | tensorwise | blockwise (cc >= 9.0) | mxfp8 (Blackwell, cc 10.x)."""
    amax_history_len: int | None = None
    """delayed only: steps of amax history per tensor; None = 1024 (TE's default)."""
    amax_compute_algo: str | None = None
    """delayed only: max | most_recent amax of the history; None = max."""
    margin: int = 0
    """delayed only: scale down by 2^margin below the FP8 maximum (headroom for growing activations)."""
    first_last_layers_bf16: int = 0
    """Keep this many layers at *each* end of the model in BF16 (0 = all FP8); not with recipe=delayed."""
    param_gather: bool = False
    """Keep the weights in FP8 (fp8_model_init) and all-gather them in FP8; needs the distributed optimizer."""

    def __post_init__(self) -> None:
        choice("fp8.format", self.format, FP8_FORMATS)
        choice("fp8.recipe", self.recipe, FP8_RECIPES)
        if self.amax_compute_algo is not None:
            choice("fp8.amax_compute_algo", self.amax_compute_algo, FP8_AMAX_ALGOS)
        if self.amax_history_len is not None:
            at_least("fp8.amax_history_len", self.amax_history_len, 1)
        at_least("fp8.margin", self.margin, 0)
        at_least("fp8.first_last_layers_bf16", self.first_last_layers_bf16, 0)
        if self.recipe != "delayed":
            for key, value, default in (
                ("amax_history_len", self.amax_history_len, None),
                ("amax_compute_algo", self.amax_compute_algo, None),
                ("margin", self.margin, 0),
            ):
                if value != default:
                    raise ConfigError(f"fp8.{key}={value!r} applies to fp8.recipe=delayed only; recipe={self.recipe} "
                                      f"computes its scales from the live tensors. Remove fp8.{key}")
        if self.recipe == "delayed" and self.first_last_layers_bf16:
            raise ConfigError("fp8.first_last_layers_bf16 > 0 cannot be used with fp8.recipe=delayed (Megatron-Core "
                              "enters fp8_autocast per layer for it, which breaks delayed scaling's amax reduction); "
                              "use fp8.recipe=tensorwise or blockwise, or set fp8.first_last_layers_bf16=0")
