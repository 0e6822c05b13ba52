"""metrics.jsonl and the throughput / MFU arithmetic.

FLOPs per token follow the usual dense-transformer count (Narayanan et al.
2021; Kaplan et al. 2020): 6 x (non-embedding parameters) for the matmuls of
forward + backward, plus 6 x h x V for the output layer, plus attention scores
and values 6 x L x s x h (causal: half of 12 L s h). MFU = achieved FLOP/s /
the GPU's dense peak for the training precision.
"""

from __future__ import annotations

import json
import os

import torch

from megatron_align.config.schema import RootConfig

# Dense peak FLOP/s per GPU (no sparsity), by training precision.
_PEAK = {
    "H100": {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "B200": {"bf16": 2250e12, "fp8": 4500e12, "fp32": 80e12},
}


def peak_flops_per_gpu(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in _PEAK.items():
        if key in name:
            return peaks.get(precision)
    return None


def flops_per_token(config: RootConfig, padded_vocab: int) -> float:
    m = config.model
    h, L, s = m.hidden_size, m.num_layers, m.seq_length
    kv = (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * m.ffn_size  # qkv, proj, SwiGLU (gate, up, down)
    # QKV biases (add_qkv_bias: ~3 FLOPs per element, fwd add + bwd sum) and QK RMSNorm (qk_layernorm: ~6 per
    # element) are elementwise; counted in the same 6x-per-parameter-token units as the GEMMs above
    per_layer += (h + 2 * kv) * m.add_qkv_bias / 2 + (h + kv) * m.qk_layernorm
    return 6.0 * L * per_layer + 6.0 * h * padded_vocab + 6.0 * L * s * h


class MetricsWriter:
    """Appends one JSON object per logged step; only rank 0 writes."""

    def __init__(self, path: str, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint step: they are about to be recomputed."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.path)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
