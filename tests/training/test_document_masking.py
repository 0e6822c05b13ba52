"""Document masking on the data side: same tokens, masks and positions from EODs; TP2xPP2 runs and resumes with it."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli, tiny_config, write_yaml

from megatron_align.model.documents import document_ids
from megatron_align.optional import have_dali
from megatron_align.training.metrics import read_metrics

MASKING = ["data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true"]


def test_loaders_give_the_same_tokens_and_masks_follow_eod(tiny_corpus, second_corpus, tmp_path, gloo_group):
    """Mixture sampler, torch and DALI loaders, held-out set: the feature changes loss masks and positions only.
    With eod_mask_loss exactly the positions whose input is EOD lose their loss (counted against the batch)."""
    from megatron_align.config import load_config
    from megatron_align.data.loader import TrainData
    from megatron_align.training.trainer import _loss_func

    base = [f"data.sources=[{{name: web, prefix: {tiny_corpus}}}, {{name: aligned, prefix: {second_corpus}}}]",
            "data.mixture.phases=[{name: all, fraction: 1.0, weights: {web: 0.5, aligned: 0.5}}]",
            "data.mixture.block_size=4", "data.mixture.default_max_repetitions=8", "data.heldout_percent=10",
            "model.seq_length=64", "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=4",
            f"run_dir={tmp_path}"]
    loader = ["data.loader=dali"] if have_dali() else []
    plain = TrainData(load_config(None, base), 32, 0, 1, str(tmp_path / "a"))
    masked = TrainData(load_config(None, base + MASKING + loader), 32, 0, 1, str(tmp_path / "b"))
    assert masked.fingerprint != plain.fingerprint and masked.fingerprint.startswith(plain.fingerprint)
    eod = plain.tokenizer.eod
    pairs = list(zip(range(4), plain.microbatches(8), masked.microbatches(8)))
    pairs += list(zip(range(2), plain.heldout_microbatches(1, 4), masked.heldout_microbatches(1, 4)))
    num_eod = 0
    for _, a, b in pairs:
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["position_ids"], torch.arange(64).expand(2, -1))
        assert bool(a["loss_mask"].all())
        is_eod = b["tokens"] == eod
        num_eod += int(is_eod.sum())
        assert int((b["loss_mask"] == 0).sum()) == int(is_eod.sum())
        assert torch.equal(b["loss_mask"] == 0, is_eod)
        _, num_tokens, _ = _loss_func(b["loss_mask"], torch.ones(b["tokens"].shape))  # what the step divides by
        assert int(num_tokens) == b["tokens"].numel() - int(is_eod.sum())
        docs = document_ids(b["tokens"], eod)
        starts = torch.stack([torch.tensor([int((d[: i + 1] == d[i]).logical_not().sum()) for i in range(64)])
                              for d in docs])
        assert torch.equal(b["position_ids"], torch.arange(64) - starts)
    assert num_eod > 3  # the windows do cross documents


@pytest.mark.slow
@pytest.mark.single_stack
def test_tp2_pp2_with_masking_resumes_tp1_checkpoint_with_the_same_losses(tmp_path, tiny_corpus):
    """Document masking + EOD loss masking, micro-batch 2 (a batch of masks): a TP1xPP1 run checkpoints at step 2;
    TP2xPP2 (4 gloo ranks) resumes it (weights, optimizer, data position) and gives TP1xPP1's steps 3-4 to fp32
    precision on the same samples. (Fresh TP2 initialisation differs from TP1's, hence the shared checkpoint.)"""
    data = {"reset_attention_mask": True, "reset_position_ids": True, "eod_mask_loss": True}
    train = {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "seed": 7}

    def run(name, *overrides, **parallel):
        config = tiny_config(tmp_path / name, tiny_corpus, data=data, train=train, parallel=parallel)
        result = run_cli("train", write_yaml(tmp_path / f"{name}.yaml", config), *overrides)
        assert result.returncode == 0, result.stderr[-4000:]

    run("one")
    run("four", f"checkpoint.load={tmp_path / 'one' / 'checkpoints' / 'iter_0000002'}", "checkpoint.interval=0",
        world_size=4, tensor=2, pipeline=2)
    one = {r["step"]: r for r in read_metrics(tmp_path / "one" / "metrics.jsonl")}
    four = {r["step"]: r for r in read_metrics(tmp_path / "four" / "metrics.jsonl")}
    assert sorted(one) == [1, 2, 3, 4] and sorted(four) == [3, 4]
    for step in four:
        assert four[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=1e-5), step
        assert four[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-4), step
        assert four[step]["consumed_samples"] == one[step]["consumed_samples"]
