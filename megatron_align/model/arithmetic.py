"""Model arithmetic: one shape, one FLOPs-per-token count, one GPU peak table.

What: :class:`ModelShape` is the shape of a Llama-style transformer (RMSNorm, SwiGLU, RoPE, GQA; optional
Q/K/V biases as in Qwen2 and per-head Q/K RMSNorm as in Qwen3), derived from
:class:`~megatron_align.config.ModelConfig` (or an HF ``config.json``).
The planner (``parallel/planner.py``), the trainer's measured MFU (``training/metrics.py``) and the
checkpoint converter (``convert/``) all read it, so a shape, a FLOP or a peak means the same everywhere.

Why: planned and measured MFU must divide the same numerator by the same denominator, or the plan
cannot be checked against the run. (They once disagreed by ~11% at 8B / 8k context: one side counted
attention non-causally.)

Notation: L layers, h hidden, f ffn hidden, a query heads, g query groups, d head dim (model.kv_channels,
default h/a; q != h where it differs, as in Qwen3-0.6B), q = a*d, kv = g*d, V vocabulary padded as Megatron pads it
(a multiple of make_vocab_size_divisible_by x TP),
s sequence length.

Parameters:
    per layer   P_lin = h*(q + 2*kv) + q*h + 3*h*f     (QKV, proj, fc1 gate+up, fc2)  + 2*h norms
                + (q + 2*kv) QKV biases (add_qkv_bias) + 2*d QK norms (qk_layernorm)
    model       N = L*(P_lin + 2h) + V*h*(1 if tied else 2) + h    (Llama-3-8B 8.03e9, 70B 70.6e9)

FLOPs per trained token (forward + backward = 3 x forward, 2 FLOPs per multiply-add; the model-FLOPs
convention of PaLM's MFU and of Megatron-LM's ``num_floating_point_operations``):
    6*L*P_lin          every linear layer
  + 6*h*V              the output layer (the input embedding is a lookup, not a GEMM)
  + 6*L*s*q            QK^T and attention x V: 12*L*s*q counted over all (query, key) pairs, halved
                       because a causal mask leaves half of them. With document masking
                       (data.reset_attention_mask) a query sees only its own document: s becomes the
                       attention span S = sum(l_i^2) / s over the document pieces l_i of a window
                       (:func:`attention_span`, from the sources' document lengths; S = s for one piece)
  + 6*L*((q + 2*kv)/2 [bias] + (q + kv) [QK norm])   the elementwise extras of Qwen2/Qwen3 (~3 FLOPs per bias
                       element, ~6 per normalised element, fwd + bwd), in the same 6-per-unit currency; < 0.01%
Reference: Megatron-Bridge's performance summary (25.11, DGX-H100, FP8 current scaling) reports
tokens/s/GPU and model TFLOP/s/GPU; their ratio is its FLOPs per token: Llama-3-8B 744e12/14451 =
5.148e10, Llama-3-70B 719e12/1602 = 4.488e11, Llama-3.1-405B 737e12/292 = 2.524e12. This formula gives
5.148e10, 4.492e11 and 2.524e12 (tests/model/test_arithmetic.py). Recompute adds hardware FLOPs, never
model FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_align.errors import ConfigError, UserError

GIB = 1024**3
PRECISIONS = ("bf16", "fp8", "fp32")


@dataclass(frozen=True)
class ModelShape:
    """The numbers that fix a model's parameters, FLOPs and tensor shapes."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    """The tokenizer's vocabulary; embedding rows beyond it are padding (:meth:`padded_vocab`)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer (Llama 3: separate)."""
    seq_length: int | None = None
    """Training sequence length; needed for FLOPs and activations, not for conversion."""
    kv_channels: int | None = None
    """Head dim (``model.kv_channels``); None = hidden_size / num_attention_heads."""
    gated_linear_unit: bool = True
    """SwiGLU (3 MLP matrices); False = a 2-matrix GELU MLP (GPT-3, to check Korthikanti's 34)."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocabulary to a multiple of this x TP."""
    qkv_bias: bool = False
    """Q/K/V projection biases (Qwen2; ``model.add_qkv_bias``)."""
    qk_norm: bool = False
    """Per-head RMSNorm of queries and keys (Qwen3; ``model.qk_layernorm``)."""
    attention_span: float | None = None
    """Causal attention span per window with document masking (:func:`attention_span`); None = seq_length."""

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "vocab_size", "make_vocab_size_divisible_by"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{key}={value!r}: must be a positive integer")
        for key in ("seq_length", "kv_channels"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"model.{key}={value!r}: must be a positive integer")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                              f"model.num_query_groups={self.num_query_groups}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by "
                              f"model.num_attention_heads={self.num_attention_heads} (or set model.kv_channels)")

    @classmethod
    def from_config(cls, model, vocab_size: int | None = None) -> ModelShape:
        """From a ``ModelConfig``; ``vocab_size`` overrides ``model.vocab_size`` (e.g. the tokenizer's)."""
        vocab = vocab_size if vocab_size is not None else model.vocab_size
        if vocab is None:
            raise ConfigError("model.vocab_size is not set: set it (or data.tokenizer) so the shape is known")
        return cls(num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_size,
                   num_attention_heads=model.num_attention_heads,
                   num_query_groups=model.num_query_groups or model.num_attention_heads, vocab_size=vocab,
                   tie_embeddings=model.tie_embeddings, seq_length=model.seq_length, kv_channels=model.kv_channels,
                   make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
                   qkv_bias=model.add_qkv_bias, qk_norm=model.qk_layernorm)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.head_dim

    @property
    def attention_length(self) -> float:
        """The s of causal attention FLOPs: seq_length, or the shorter span document masking leaves."""
        return self.attention_span if self.attention_span is not None else self.seq_length

    def padded_vocab(self, tp: int = 1) -> int:
        """Embedding rows Megatron allocates: the vocabulary rounded up to make_vocab_size_divisible_by x TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def linear_params_per_layer(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        mlp = (3 if self.gated_linear_unit else 2) * h * f
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h + mlp

    def params_per_layer(self) -> int:
        extras = (self.q_size + 2 * self.kv_size) * self.qkv_bias + 2 * self.head_dim * self.qk_norm
        return self.linear_params_per_layer() + 2 * self.hidden_size + extras

    def num_parameters(self, tp: int = 1) -> int:
        """Total parameters of the GPTModel Megatron builds (vocabulary padded for ``tp``)."""
        embeddings = self.padded_vocab(tp) * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * self.params_per_layer() + embeddings + self.hidden_size

    def flops_per_token(self, tp: int = 1) -> float:
        """Model FLOPs of one trained token: 6*L*P_lin + 6*h*V + 6*L*s*q (module docstring)."""
        if self.seq_length is None:
            raise ConfigError("model.seq_length is needed to count attention FLOPs")
        linear = self.num_layers * self.linear_params_per_layer() + self.padded_vocab(tp) * self.hidden_size
        attention = self.num_layers * self.attention_length * self.q_size
        elementwise = self.num_layers * ((self.q_size + 2 * self.kv_size) * self.qkv_bias / 2
                                         + (self.q_size + self.kv_size) * self.qk_norm)
        return 6.0 * linear + 6.0 * attention + 6.0 * elementwise


def attention_span(document_lengths, seq_length: int) -> float:
    """``sum(l_i^2) / (num_windows * s)``: the causal span of document-masked attention, in tokens.

    Training windows cut the concatenated documents every ``s`` tokens; a window's pieces ``l_i`` are
    its documents clipped at the window edges. Causal attention over a piece of ``l`` tokens has
    ``l^2 / 2`` (query, key) pairs, one window without masking ``s^2 / 2``; so attention FLOPs per token
    scale from ``s`` to this span (``s`` itself when documents are longer than windows).
    """
    import numpy as np

    ends = np.cumsum(np.asarray(document_lengths, dtype=np.int64))
    total = int(ends[-1]) // seq_length * seq_length if len(ends) else 0
    if total == 0:
        return float(seq_length)
    cuts = np.union1d(ends[ends < total], np.arange(seq_length, total + 1, seq_length, dtype=np.int64))
    pieces = np.diff(cuts, prepend=0).astype(np.float64)
    return float((pieces**2).sum() / total)


def count_parameters(model: ModelShape, tp: int = 1) -> int:
    return model.num_parameters(tp)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    """Usable HBM as the driver reports it (GiB)."""
    bf16_tflops: float
    """Dense BF16 tensor-core peak (no sparsity)."""
    fp8_tflops: float | None
    """Dense FP8 peak; None where the GPU has no FP8 tensor cores."""
    nvlink_gb_s: float
    """NVLink bandwidth per GPU per direction (GB/s)."""
    network_gb_s: float
    """Inter-node bandwidth per GPU (one NIC per GPU; 400 Gb/s = 50 GB/s)."""
    hbm_tb_s: float
    """HBM bandwidth (TB/s), for the memory-bound optimizer step."""
    fp32_tflops: float
    """Dense FP32 peak on CUDA cores: what fp32 GEMMs get, since torch leaves TF32 off by default."""
    device_names: tuple[str, ...] = ()
    """Substrings of ``torch.cuda.get_device_name()`` that identify this GPU."""

    def peak_flops(self, precision: str) -> float | None:
        """Dense peak FLOP/s of a training precision (fp8: FP8 tensor cores, bf16: BF16, fp32: CUDA cores)."""
        if precision == "fp8":
            return self.fp8_tflops * 1e12 if self.fp8_tflops else None
        return (self.fp32_tflops if precision == "fp32" else self.bf16_tflops) * 1e12


# Vendor datasheets (SXM parts, dense). memory_gib: what nvidia-smi reports (81559 MiB on an H100 80GB).
GPUS: dict[str, GpuSpec] = {
    "h100-80gb": GpuSpec("h100-80gb", 79.6, 989.0, 1979.0, 450.0, 50.0, 3.35, 67.0, ("H100",)),
    "h200": GpuSpec("h200", 140.4, 989.0, 1979.0, 450.0, 50.0, 4.8, 67.0, ("H200",)),
    "a100-80gb": GpuSpec("a100-80gb", 80.0, 312.0, None, 300.0, 25.0, 2.0, 19.5, ("A100",)),
    "b200": GpuSpec("b200", 179.1, 2250.0, 4500.0, 900.0, 50.0, 8.0, 80.0, ("B200",)),
}
GPU_ALIASES = {"h100-sxm": "h100-80gb", "h100": "h100-80gb", "h200-141gb": "h200", "a100": "a100-80gb"}


def get_gpu(name: str) -> GpuSpec:
    key = GPU_ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise UserError(f"unknown GPU {name!r}: choose one of {', '.join(sorted([*GPUS, *GPU_ALIASES]))}")
    return GPUS[key]


def gpu_for_device(device_name: str) -> GpuSpec | None:
    """The table entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3'; None if unknown."""
    for spec in GPUS.values():
        if any(part in device_name for part in spec.device_names):
            return spec
    return None
