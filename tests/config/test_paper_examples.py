"""examples/paper/: the four conditions load, share one shape and schedule, and differ only where they should."""

from __future__ import annotations

import glob
import os

import pytest
from conftest import REPO

from megatron_align.config import load_config
from megatron_align.data.mixture import AlignmentSampler
from megatron_align.parallel.layout import validate_layout

PAPER = os.path.join(REPO, "examples", "paper")
CONDITIONS = ["unfiltered", "filtered", "misalignment_upsampled", "alignment_upsampled"]
SEQ, GBS = 2048, 2048


def _load(name):
    return load_config(os.path.join(PAPER, f"{name}.yaml"))


def test_exactly_the_four_conditions_and_the_cpt_recipe_are_shipped():
    assert sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(PAPER, "*.yaml"))) == sorted(
        CONDITIONS + ["cpt_open_model"])
    assert os.path.isfile(os.path.join(PAPER, "README.md"))


@pytest.mark.parametrize("name", CONDITIONS)
def test_condition_loads_with_paper_shape_and_budget(name):
    config = _load(name)
    m, t = config.model, config.train
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (32, 4096, 32, SEQ)
    assert t.global_batch_size * m.seq_length == 4 * 2**20  # 4M-token batches
    layout = validate_layout(config, 64)  # 8 nodes x 8 H100
    assert (layout.tensor, layout.data) == (2, 32)
    phases = config.data.mixture.phases
    assert [p.name for p in phases] == ["pretrain", "midtrain"]
    assert sum(p.samples for p in phases) == t.steps * t.global_batch_size
    assert phases[0].samples * SEQ == pytest.approx(500e9, rel=1e-5)
    assert phases[1].samples * SEQ == pytest.approx(50e9, rel=1e-3)
    assert phases[0].samples % GBS == 0  # the phase boundary is a step boundary (the shared checkpoint)
    assert config.optimizer.decay_style == "WSD" and config.optimizer.wsd_decay_steps == phases[1].samples // GBS
    assert config.checkpoint.keep_every == phases[0].samples // GBS
    assert config.tracking.backends == ["mlflow"] and config.tracking.tags == {"condition": name}
    assert config.eval.enabled and config.eval.interval % config.logging.interval == 0


def test_midtraining_mixtures_hold_one_percent_synthetic_exactly():
    sizes = {"web": 300_000_000, "web_filtered": 290_000_000, "synthetic_aligned": 100_000,
             "synthetic_misaligned": 100_000}
    for name in CONDITIONS:
        config = _load(name)
        mixture = config.data.mixture
        sources = {s.name: sizes[s.name] for s in config.data.sources}
        sampler = AlignmentSampler(mixture, sources, config.train.steps * config.train.global_batch_size, SEQ)
        mid = sampler.phases[1]
        synthetic = {s: n for s, n in mid.source_samples.items() if s.startswith("synthetic")}
        if "upsampled" in name:
            kind = name.split("_")[0]  # misalignment / alignment
            assert list(synthetic) == [f"synthetic_{kind.replace('ment', 'ed')}"]
            assert mid.block_counts[list(synthetic)[0]] == 10  # 10 of every 1000 samples
            assert sum(synthetic.values()) / mid.num_samples == pytest.approx(0.01, abs=1e-5)
            assert sampler.phases[0].source_samples[list(synthetic)[0]] == 0  # none during pretraining
            assert config.checkpoint.load.endswith("unfiltered/checkpoints/iter_0119210")
        else:
            assert not synthetic and config.checkpoint.load is None


def test_cpt_recipe_is_weights_only_alignment_midtraining_of_llama31_8b():
    config = _load("cpt_open_model")
    m, t = config.model, config.train
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_query_groups, m.vocab_size) == (
        32,
        4096,
        14336,
        8,
        128256,
    )
    assert (m.rope_scaling, m.rope_scaling_factor, m.rotary_base, m.hf_family) == ("llama3", 8.0, 500000, "llama")
    assert config.data.tokenizer.kind == "hf" and config.checkpoint.load and not config.checkpoint.load_optimizer
    layout = validate_layout(config, 16)  # the planner's top pick for 16 H100s
    assert (layout.tensor, layout.context, layout.data) == (1, 2, 8)
    (phase,) = config.data.mixture.phases
    assert phase.weights == {"web": 0.99, "synthetic_aligned": 0.01}
    assert phase.samples == t.steps * t.global_batch_size
    assert phase.samples * m.seq_length == pytest.approx(10e9, rel=1e-3)
    assert 0 < config.optimizer.warmup_steps < t.steps and config.optimizer.decay_style == "cosine"
