"""data.loader=dali (NVIDIA DALI, CPU-only here) yields exactly the torch loader's microbatches."""

import pytest
import torch

from megatron_align.optional import have_dali


@pytest.mark.skipif(
    not have_dali(), reason="nvidia-dali-cuda120 is not installed (pip install -e '.[dev]' installs it)"
)
def test_dali_and_torch_loaders_yield_identical_batches(tiny_corpus, second_corpus, tmp_path, gloo_group):
    from megatron_align.config import load_config
    from megatron_align.data.loader import TrainData

    base = [f"data.sources=[{{name: web, prefix: {tiny_corpus}}}, {{name: aligned, prefix: {second_corpus}}}]",
            "data.mixture.phases=[{name: all, fraction: 1.0, weights: {web: 0.5, aligned: 0.5}}]",
            "data.mixture.block_size=4", "data.mixture.default_max_repetitions=8",
            "model.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=4",
            f"run_dir={tmp_path}"]
    torch_cfg = load_config(None, base)
    dali_cfg = load_config(None, base + ["data.loader=dali", "data.prefetch=3"])
    consumed = 8  # start mid-run, as after a resume
    plain = TrainData(torch_cfg, 32, dp_rank=1, dp_size=2, cache_dir=str(tmp_path / "a")).microbatches(consumed)
    piped = TrainData(dali_cfg, 32, dp_rank=1, dp_size=2, cache_dir=str(tmp_path / "b")).microbatches(consumed)
    assert type(piped).__name__ == "DaliMicrobatches"
    for _ in range(6):  # crosses step boundaries
        a, b = next(plain), next(piped)
        assert set(a) == set(b)
        for key in a:
            assert b[key].dtype == a[key].dtype and b[key].shape == a[key].shape, key
            assert torch.equal(a[key], b[key]), key
