"""Model arithmetic: one shape, one FLOPs count reproducing Megatron-Bridge's published numbers, one GPU table,
and planner and trainer metrics reading the same numbers."""

import os

import numpy as np
import pytest
from conftest import REPO

from megatron_align.config import load_config
from megatron_align.convert.mapping import LlamaDims
from megatron_align.model.arithmetic import GPUS, ModelShape, attention_span, get_gpu, gpu_for_device
from megatron_align.model.builder import padded_vocab_size
from megatron_align.parallel.planner import Candidate, PlanOptions, evaluate_layout, load_plan_inputs
from megatron_align.training.metrics import flops_per_token

LLAMA3_8B = ModelShape(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                       num_query_groups=8, vocab_size=128256, seq_length=8192)
LLAMA3_70B = ModelShape(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                        num_query_groups=8, vocab_size=128256, seq_length=8192)
LLAMA31_405B = ModelShape(num_layers=126, hidden_size=16384, ffn_hidden_size=53248, num_attention_heads=128,
                          num_query_groups=8, vocab_size=128256, seq_length=8192)

# Megatron-Bridge performance summary, 25.11 NeMo container, DGX-H100, FP8 current scaling
# (docs/performance-summary.md of NVIDIA-NeMo/Megatron-Bridge): (model, TP, tokens/s/GPU, model TFLOP/s/GPU).
PUBLISHED_H100 = [(LLAMA3_8B, 1, 14451, 744), (LLAMA3_70B, 4, 1602, 719), (LLAMA31_405B, 8, 292, 737)]


@pytest.mark.parametrize("shape, tp, tokens_per_s, tflops", PUBLISHED_H100, ids=["8b", "70b", "405b"])
def test_flops_per_token_reproduces_megatron_bridge_within_1_percent(shape, tp, tokens_per_s, tflops):
    published = tflops * 1e12 / tokens_per_s  # their FLOPs per token
    assert shape.flops_per_token(tp) == pytest.approx(published, rel=0.01)


def test_70b_flops_per_token_is_6n_plus_output_plus_causal_attention():
    m = LLAMA3_70B
    L, h, s, V = m.num_layers, m.hidden_size, m.seq_length, m.padded_vocab(4)
    six_n = 6 * L * m.linear_params_per_layer()
    assert m.flops_per_token(4) == six_n + 6 * h * V + 6 * L * s * h
    assert m.flops_per_token(4) == pytest.approx(4.49e11, rel=0.01)
    # The non-causal count the planner used before (12*L*s*q) is 7% higher: outside the 1% above.
    assert (m.flops_per_token(4) + 6 * L * s * h) / (719e12 / 1602) > 1.06


def test_a_head_dim_other_than_hidden_over_heads_counts_its_projections_and_attention():
    """Qwen3-0.6B's shape: hidden 1024, 16 heads of 128 (q = 2048 != h), 8 kv heads, tied (model.kv_channels=128)."""
    m = ModelShape(num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16, num_query_groups=8,
                   vocab_size=151936, tie_embeddings=True, seq_length=4096, kv_channels=128, qk_norm=True,
                   make_vocab_size_divisible_by=1)
    L, h, s, V = 28, 1024, 4096, 151936
    per_layer = h * (2048 + 2 * 1024) + 2048 * h + 3 * h * 3072
    assert m.linear_params_per_layer() == per_layer
    assert (
        m.num_parameters() == L * (per_layer + 2 * h + 2 * 128) + V * h + h == 596_049_920
    )  # transformers' Qwen3-0.6B
    assert m.flops_per_token() == 6 * (L * per_layer + h * V) + 6 * L * s * 2048 + 6 * L * (2048 + 1024)


def test_planner_and_trainer_metrics_count_the_same_flops_for_the_same_config():
    path = os.path.join(REPO, "examples", "llama3_8b_fp8.yaml")
    config = load_config(path)
    tp = config.parallel.tensor
    padded = padded_vocab_size(config.model.vocab_size, config.model.make_vocab_size_divisible_by, tp)
    measured_side = flops_per_token(config, padded)  # what the trainer logs MFU with
    planned_side = load_plan_inputs(path).model.flops_per_token(tp)
    assert measured_side == planned_side
    assert measured_side == pytest.approx(744e12 / 14451, rel=0.01)


def test_planned_mfu_is_measured_mfu_at_the_planned_speed():
    """MFU the trainer would log at the planner's predicted tokens/s equals the planner's MFU."""
    path = os.path.join(REPO, "examples", "llama3_8b_fp8.yaml")
    config = load_config(path)
    inputs = load_plan_inputs(path)
    gpu = get_gpu("h100-80gb")
    result = evaluate_layout(inputs.model, Candidate(2, 1, 1, 1, 32, 1), gpu, PlanOptions(precision="fp8"),
                             inputs.global_batch_size)
    padded = padded_vocab_size(config.model.vocab_size, config.model.make_vocab_size_divisible_by, 2)
    trainer_peak = gpu_for_device("NVIDIA H100 80GB HBM3").peak_flops("fp8")  # metrics.peak_flops_per_gpu's lookup
    trainer_mfu = flops_per_token(config, padded) * result.tokens_per_s_per_gpu / trainer_peak
    assert trainer_mfu == pytest.approx(result.mfu, rel=1e-12)


def test_shape_from_model_config_uses_the_one_ffn_default_and_is_the_converter_shape():
    config = load_config(None, ["model.hidden_size=96", "model.num_attention_heads=6", "model.vocab_size=1000"])
    shape = ModelShape.from_config(config.model)
    assert shape.ffn_hidden_size == config.model.ffn_size == 256  # 8*96/3 = 256, a multiple of 64
    assert shape.num_query_groups == 6 and shape.heads_per_group == 1 and not shape.tie_embeddings
    assert LlamaDims is ModelShape
    assert ModelShape.from_config(config.model, vocab_size=50).vocab_size == 50


def test_gpu_table_lookup_by_device_name_and_peaks_by_precision():
    assert gpu_for_device("NVIDIA H100 80GB HBM3") is GPUS["h100-80gb"]
    assert gpu_for_device("NVIDIA A100-SXM4-80GB") is GPUS["a100-80gb"]
    assert gpu_for_device("NVIDIA B200") is GPUS["b200"]
    assert gpu_for_device("Tesla T4") is None
    h100 = GPUS["h100-80gb"]
    assert (h100.peak_flops("bf16"), h100.peak_flops("fp8"), h100.peak_flops("fp32")) == (989e12, 1979e12, 67e12)
    assert GPUS["a100-80gb"].peak_flops("fp8") is None


def test_shape_errors_name_the_key():
    with pytest.raises(ValueError, match=r"model.num_query_groups=3"):
        ModelShape(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=3,
                   vocab_size=10)
    shape = ModelShape(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                       vocab_size=10)
    with pytest.raises(ValueError, match=r"model.seq_length is needed"):
        shape.flops_per_token()


def test_attention_span_of_document_masking(tmp_path, tiny_corpus):
    """sum(l^2)/s over window pieces: s for documents longer than windows, l for documents of exactly l tokens;
    the planner and the trainer's MFU count the same span for a config with data.reset_attention_mask."""
    assert attention_span([10_000], 2048) == 2048
    assert attention_span([512] * 64, 2048) == 512
    assert attention_span([3, 5], 4) == pytest.approx((9 + 1 + 16) / 8)  # pieces 3 | 1, 4 (a document crosses)
    lengths = np.random.default_rng(0).integers(1, 5000, 2000)
    assert 0 < attention_span(lengths, 2048) < 2048
    overrides = [f"data.sources=[{{name: web, prefix: {tiny_corpus}}}]", "data.reset_attention_mask=true",
                 "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.vocab_size=512",
                 "model.seq_length=256", "train.global_batch_size=8"]
    config = load_config(None, overrides)
    inputs = load_plan_inputs(None, overrides)
    span = attention_span(np.asarray(_lengths(tiny_corpus)), 256)
    assert inputs.model.attention_length == pytest.approx(span) and span < 256 and "attention span" in inputs.note
    assert flops_per_token(config, 512, span) == inputs.model.flops_per_token()
    assert flops_per_token(config, 512, span) < flops_per_token(config, 512)


def _lengths(prefix):
    from megatron_align.data.documents import document_lengths

    return document_lengths(prefix)
