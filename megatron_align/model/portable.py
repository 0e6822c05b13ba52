"""The portable layer spec: Megatron-Core's local spec with PyTorch SDPA as core attention.

What: ``model.spec=portable`` builds the same ``TransformerLayer`` as ``local`` (Megatron-Core's
Column/RowParallelLinear, torch ``RMSNorm`` through ``WrappedTorchNorm``, SwiGLU MLP, RoPE), and
only swaps the module in the ``core_attention`` slot for :class:`PortableDotProductAttention`,
which calls ``torch.nn.functional.scaled_dot_product_attention``. PyTorch then picks a kernel:
FlashAttention-2 or memory-efficient attention on a GPU (no s x s score matrix in memory),
its fused CPU kernel or the math reference on CPU.

Why: the local spec's attention materialises ``[b, heads, s, s]`` scores and runs an unfused
softmax unless Megatron's own CUDA kernels are built; Transformer Engine (the ``te`` spec) is
fast but a heavy CUDA-only dependency. SDPA ships with every PyTorch.

The one idea: core attention owns no parameters and no sharded state (apart from a learnable
softmax offset this spec does not support), so replacing it leaves every parameter name,
every ``state_dict`` key and every ``sharded_state_dict`` key of the local spec unchanged.
Checkpoints move freely between ``local`` and ``portable`` (tests/model/test_portable.py
loads a local checkpoint into a portable run and gets the same losses). The class subclasses
Megatron-Core's ``DotProductAttention`` to inherit its constructor (head/partition bookkeeping)
and ``sharded_state_dict``, and keeps its ``forward`` signature.

Layouts: Megatron passes ``[s, b, heads, head_dim]``; SDPA wants ``[b, heads, s, head_dim]``.
GQA: key/value heads are shared by ``heads // groups`` query heads, query head i using
kv head ``i // (heads // groups)`` -- what ``repeat_interleave`` on the head axis builds and what
SDPA's ``enable_gqa`` does without the copy. ``enable_gqa`` is used on CUDA with bf16/fp16
inputs, where the flash kernel supports it natively; elsewhere (fp32, CPU) the kv heads are
expanded, because the other kernels would fall back to the O(s^2)-memory math path.
Masks: Megatron's boolean masks mark positions to *drop*; SDPA's mark positions to *keep*.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_align.errors import ConfigError

_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool,
    keep_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    native_gqa: bool | None = None,
) -> torch.Tensor:
    """SDPA on Megatron layouts: q ``[sq, b, hq, d]``, k/v ``[sk, b, hkv, d]`` -> ``[sq, b, hq * d]``.

    ``keep_mask`` (bool, True = attend) broadcasts to ``[b, hq, sq, sk]``. ``native_gqa``: use
    SDPA's ``enable_gqa`` instead of expanding kv heads (default: on CUDA with 16-bit inputs).
    """
    sq, b, hq, d = query.shape
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
    repeats = hq // k.size(1)
    kwargs = {}
    if repeats > 1:
        if native_gqa is None:
            native_gqa = _HAS_ENABLE_GQA and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
        if native_gqa:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask, dropout_p=dropout_p, is_causal=causal,
                                         scale=scale, **kwargs)
    return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)  # [b, h, s, d] -> [s, b, h*d]


class PortableDotProductAttention(DotProductAttention):
    """Megatron-Core core attention computed by ``torch.nn.functional.scaled_dot_product_attention``."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        if config.softmax_type != "vanilla":
            raise ConfigError(f"model.spec=portable: softmax_type={config.softmax_type!r} (softmax offsets) is not "
                              "expressible with scaled_dot_product_attention; use model.spec=local or te")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ConfigError("model.spec=portable does not implement sliding-window attention; use model.spec=te")
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        # The parent divides softmax_scale by the layer number when apply_query_key_layer_scaling is on and lets
        # its softmax multiply it back (an fp16 overflow guard); SDPA gets the product directly.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: torch.Tensor | None = None,
                packed_seq_params=None) -> torch.Tensor:
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> context ``[sq, b, np * hn]``."""
        if packed_seq_params is not None:
            raise ConfigError("model.spec=portable does not support packed sequences (THD); use model.spec=te")
        if attention_bias is not None:
            raise ConfigError("model.spec=portable does not support an additive attention bias; use model.spec=te")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, sk = query.size(0), key.size(0)
        keep_mask = None
        causal = False
        if attention_mask is not None:
            keep_mask = ~attention_mask  # Megatron: True = masked out (used as given, as the local spec's softmax does)
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ConfigError(f"model.spec=portable: causal attention without a mask needs equal query/key "
                                  f"lengths, got {sq} and {sk}")
            causal = True
        dropout_p = self.attention_dropout.p if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 and not self.config.sequence_parallel
               else nullcontext())
        with rng:
            return sdpa_attention(query, key, value, causal=causal, keep_mask=keep_mask, scale=self.sdpa_scale,
                                  dropout_p=dropout_p)


def get_gpt_layer_portable_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron-Core's local GPT layer spec (RMSNorm) with SDPA core attention and torch norms."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    layer = spec.submodules
    layer.input_layernorm = WrappedTorchNorm
    layer.pre_mlp_layernorm = WrappedTorchNorm
    layer.self_attention.submodules.core_attention = PortableDotProductAttention
    return spec
