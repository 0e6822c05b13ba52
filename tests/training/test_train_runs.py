"""End-to-end runs of `megatron-align train` on CPU/gloo with real Megatron-Core."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, tiny_config, write_yaml

from megatron_align.training.checkpoint import is_complete, resolve_checkpoint
from megatron_align.training.metrics import read_metrics

pytestmark = pytest.mark.slow


def _train(tmp_path, name, corpus, *overrides, env=None, **sections):
    path = write_yaml(tmp_path / f"{name}.yaml", tiny_config(tmp_path / name, corpus, **sections))
    return run_cli("train", path, *overrides, env=env), tmp_path / name


def _ok(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"


def test_reshard_tp1_checkpoint_into_tp2_pp2_dp2(tmp_path, tiny_corpus):
    """TP1xPP1 checkpoint at step 2, continued for 2 steps under TP2xPP2xDP2 on 8 gloo ranks: same losses."""
    result, run_a = _train(tmp_path, "a", tiny_corpus)
    _ok(result)
    result, run_b = _train(tmp_path, "b", tiny_corpus,
                           f"checkpoint.load={run_a / 'checkpoints' / 'iter_0000002'}",
                           parallel={"world_size": 8, "tensor": 2, "pipeline": 2})
    _ok(result)
    a = {r["step"]: r for r in read_metrics(run_a / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(run_b / "metrics.jsonl")}
    assert sorted(b) == [3, 4]  # resumed at step 2, ran 2 steps on 8 ranks
    for step in (3, 4):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-5), step
        assert b[step]["consumed_samples"] == a[step]["consumed_samples"]
    assert b[4]["grad_norm"] == pytest.approx(a[4]["grad_norm"], rel=1e-4)
    saved = json.loads((run_b / "checkpoints" / "iter_0000004" / "megatron_align.json").read_text())
    assert saved["layout"] == {"tensor": 2, "pipeline": 2, "context": 1, "virtual_pipeline": 1, "data": 2}
    assert (run_b / "config.yaml").read_text().count("tensor: 2") == 1


def test_exact_resume_is_bitwise(tmp_path, tiny_corpus):
    """6 steps straight == 3 steps, stop, resume 3 (2 DP ranks): identical losses bit for bit."""
    par = {"world_size": 2}
    result, straight = _train(tmp_path, "straight", tiny_corpus, "train.steps=6", "checkpoint.interval=0", parallel=par)
    _ok(result)
    result, split = _train(tmp_path, "split", tiny_corpus, "train.steps=6", "train.stop_at_step=3", parallel=par)
    _ok(result)
    assert resolve_checkpoint(str(split / "checkpoints")).endswith("iter_0000003")
    result, _ = _train(tmp_path, "split", tiny_corpus, "train.steps=6", parallel=par)
    _ok(result)
    assert "resumed from" in result.stdout
    def losses(run):
        return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(run / "metrics.jsonl")]

    assert [s for s, *_ in losses(split)] == [1, 2, 3, 4, 5, 6]
    assert losses(split) == losses(straight)
    assert losses(straight)[-1][1] < losses(straight)[0][1]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, tiny_corpus):
    """SIGKILL after the shards of step 4 are written but before commit: latest stays at 2, resume completes."""
    result, run = _train(tmp_path, "crash", tiny_corpus, env={"MEGATRON_ALIGN_FAULT": "checkpoint.before_commit@4"})
    assert result.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    assert (ckpts / ".tmp_iter_0000004").is_dir() and not (ckpts / "iter_0000004").exists()
    assert resolve_checkpoint(str(ckpts)).endswith("iter_0000002")
    result, _ = _train(tmp_path, "crash", tiny_corpus)
    _ok(result)
    assert "resumed from" in result.stdout and "iter_0000002" in result.stdout
    assert is_complete(str(ckpts / "iter_0000004"))
    assert not (ckpts / ".tmp_iter_0000004").exists()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_crash_before_latest_update_resumes_newest_complete(tmp_path, tiny_corpus):
    result, run = _train(tmp_path, "late", tiny_corpus, "train.steps=4",
                         env={"MEGATRON_ALIGN_FAULT": "checkpoint.before_latest@4"})
    assert result.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    assert resolve_checkpoint(str(ckpts)).endswith("iter_0000004")  # renamed = complete, even if latest lags


def test_interleaved_pipeline_and_fingerprint_guard(tmp_path, tiny_corpus):
    """PP2 x VPP2 on 2 ranks trains; resuming with a different data seed is refused, naming the fix."""
    par = {"world_size": 2, "pipeline": 2, "virtual_pipeline": 2}
    result, run = _train(tmp_path, "vpp", tiny_corpus, "train.steps=2", parallel=par)
    _ok(result)
    assert len(read_metrics(run / "metrics.jsonl")) == 2
    result, _ = _train(tmp_path, "vpp", tiny_corpus, "train.steps=3", "train.seed=99", parallel=par)
    assert result.returncode == 2
    assert "data fingerprint" in result.stderr and "checkpoint.load_optimizer=false" in result.stderr
