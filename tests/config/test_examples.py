"""Every shipped example config loads, and its layout is valid for a plausible world size."""

import glob
import os

import pytest

from megatron_align.config import load_config
from megatron_align.parallel.layout import validate_layout

from conftest import REPO

EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml")))
WORLD = {"tiny_cpu.yaml": 2, "llama_1b.yaml": 8, "llama3_8b.yaml": 64, "llama3_70b.yaml": 1024, "llama3_8b_fp8.yaml": 64, "llama3_70b_fp8.yaml": 512, "pythia_6p9b_llama.yaml": 64}


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
    from megatron_align.training.metrics import flops_per_token

    # 6N per token dominates: 8B shape ~ 6 * 8.0e9 (+ attention) per token
    config = load_config(os.path.join(REPO, "examples", "llama3_8b.yaml"))
    assert 6 * 7.5e9 < flops_per_token(config, 128256) < 6 * 9.5e9 + 6 * 32 * 8192 * 4096
