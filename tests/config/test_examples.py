"""Every shipped example config loads, and its layout is valid for a plausible world size."""

import glob
import os

import pytest
from conftest import REPO

from megatron_align.config import load_config
from megatron_align.parallel.layout import validate_layout

EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml")))
WORLD = {
    "tiny_cpu.yaml": 2,
    "llama_1b.yaml": 8,
    "llama3_8b.yaml": 64,
    "llama3_70b.yaml": 1024,
    "llama3_8b_fp8.yaml": 64,
    "llama3_70b_fp8.yaml": 512,
    "pythia_6p9b_llama.yaml": 64,
}


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_config_is_valid(path):
    config = load_config(path)
    world = WORLD.get(os.path.basename(path), config.parallel.world_size)
    layout = validate_layout(config, world)  # raises ConfigError naming the key when the layout does not fit
    p, t = config.parallel, config.train
    assert (layout.tensor, layout.pipeline, layout.context, layout.virtual_pipeline) == \
        (p.tensor, p.pipeline, p.context, p.virtual_pipeline)
    assert layout.tensor * layout.pipeline * layout.context * layout.data == layout.world_size == world
    assert t.global_batch_size % (t.micro_batch_size * layout.data) == 0


def test_preset_parameter_counts():
    from megatron_align.parallel.planner import load_plan_inputs
    from megatron_align.training.metrics import flops_per_token

    # Megatron-Bridge (25.11, DGX-H100) reports 744 model TFLOP/s/GPU at 14,451 tokens/s/GPU for this shape:
    # 5.148e10 FLOPs per token. Counting attention non-causally (12*L*s*h) would be 12.5% higher.
    path = os.path.join(REPO, "examples", "llama3_8b.yaml")
    config = load_config(path)
    measured = flops_per_token(config, 128256)
    assert measured == pytest.approx(744e12 / 14451, rel=0.01)
    assert measured == load_plan_inputs(path).model.flops_per_token(config.parallel.tensor)  # the planner's count
