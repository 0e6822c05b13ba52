"""The FP8 and Pythia-shape presets: FP8 checks pass on an H100 with a current TE; the 6.9B matches Pythia's size."""

import os

import pytest
import torch
from conftest import REPO

from megatron_align.config import load_config
from megatron_align.model.builder import build_transformer_config
from megatron_align.model.fp8 import FP8Environment, fp8_ddp_kwargs, validate_fp8
from megatron_align.parallel.layout import validate_layout
from megatron_align.parallel.planner import count_parameters, load_plan_inputs


@pytest.mark.parametrize("name, world", [("llama3_8b_fp8.yaml", 64), ("llama3_70b_fp8.yaml", 512)])
def test_fp8_presets_are_valid_for_h100(name, world):
    path = os.path.join(REPO, "examples", name)
    config = load_config(path)
    validate_layout(config, world)
    h100 = FP8Environment((9, 0), "2.5.0", "NVIDIA H100 80GB HBM3")
    validate_fp8(config, h100)
    tconfig = build_transformer_config(config, h100)
    assert (tconfig.fp8, tconfig.fp8_recipe, tconfig.fp8_param) == ("hybrid", "tensorwise", False)
    assert tconfig.first_last_layers_bf16 and tconfig.params_dtype == torch.bfloat16
    assert fp8_ddp_kwargs(config) == {}


def test_pythia_shape_matches_pythia_6p9b():
    path = os.path.join(REPO, "examples", "pythia_6p9b_llama.yaml")
    config = load_config(path)
    m = config.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (32, 4096, 32, 2048)
    assert config.train.global_batch_size * m.seq_length == 4 * 2**20  # 4M-token batches
    assert not m.tie_embeddings and m.num_query_groups is None
    # SwiGLU width chosen so the MLP has GPT-NeoX's 2 x h x 4h weights: 3 x h x f within 0.5%
    assert abs(3 * m.ffn_size - 2 * 4 * m.hidden_size) / (8 * m.hidden_size) < 0.005
    pythia_6p9b = 6_857_302_016  # EleutherAI/pythia-6.9b parameter count
    assert abs(count_parameters(load_plan_inputs(path).model) - pythia_6p9b) / pythia_6p9b < 0.005
