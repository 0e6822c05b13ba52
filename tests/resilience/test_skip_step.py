"""Training health: the z-score skip step and per-layer norms.

Unit: the z-score test, its warm-up and its state. End to end (one CPU run, resumed mid-window, against a
reference run): an injected spike's update is skipped and counted, later steps equal a run whose update at that
step was dropped by the NaN policy, and per-layer norms equal norms computed from the checkpoints."""

from __future__ import annotations

import json
import math
import os

import pytest
from conftest import run_cli, tiny_config, write_yaml

from megatron_align.config.resilience import SkipStepConfig
from megatron_align.resilience.inrank.skip_step import SkipStep, zscore


def test_outliers_need_history_and_sigma_and_state_survives():
    cb = SkipStep(SkipStepConfig(enabled=True, window=4, min_history=3, sigma=3.0))
    for value in (2.0, 2.1):
        cb.history["loss"].append(value)
    assert cb.outlier("loss", 100.0) is None  # 2 < min_history
    cb.history["loss"].append(1.9)
    assert "sigma above" in cb.outlier("loss", 100.0)
    assert cb.outlier("loss", 2.1) is None and cb.outlier("loss", float("nan")) is None
    assert cb.outlier("loss", 0.0) is None  # downward is fine
    assert abs(zscore(3.0, [1.0, 3.0]) - 1.0) < 1e-12
    cb.history["loss"].extend([2.0, 2.2])  # window 4 keeps the newest
    restored = SkipStep(cb.cfg)
    restored.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    assert list(restored.history["loss"]) == [2.1, 1.9, 2.0, 2.2]
    with pytest.raises(ValueError, match="skip_step.metrics"):
        SkipStepConfig(metrics=["lr"])


def _records(run_dir) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _checkpoint_norms(path: str, num_layers: int, minus: str | None = None) -> dict[str, float]:
    """Per-group norms of a checkpoint's weights (of ``path`` minus ``minus``: the update between them)."""
    from megatron_align.convert.dist_reader import DistCheckpoint

    ckpt, other = DistCheckpoint(path), DistCheckpoint(minus) if minus else None
    squares: dict[str, float] = {}

    def add(group, key, layer=None):
        value = ckpt.read(key, layer).double()
        if other is not None:
            value = value - other.read(key, layer).double()
        squares[group] = squares.get(group, 0.0) + float(value.pow(2).sum())

    for key in ckpt.model_keys:
        if key.startswith("decoder.layers."):
            for i in range(num_layers):
                add(f"layer{i:02d}", key, i)
        else:
            add("embedding" if key.startswith("embedding.") else "final", key)
    return {g: math.sqrt(v) for g, v in squares.items()}


@pytest.mark.slow
def test_spike_is_skipped_like_a_dropped_update_and_resume_keeps_the_window(tmp_path, tiny_corpus):
    spike_step, steps = 7, 10
    health = {"skip_step": {"enabled": True, "metrics": ["grad_norm"], "window": 8, "min_history": 4,
                            "sigma": 8.0},
              "layer_norms": {"interval": 1}}

    def config(name, fault, interval=3, **train):  # saves at 3, 6, 9 and 10: two consecutive for the update norm
        return write_yaml(tmp_path / f"{name}.yaml", tiny_config(
            tmp_path / name, tiny_corpus, train={"steps": steps, **train}, resilience={**health, "inject": [fault]},
            checkpoint={"interval": interval, "keep_last": 20}))

    # The run under test stops at step 5 and resumes: the spike at step 7 needs the window saved at step 5.
    first = run_cli("train", config("run", f"spike:1000@{spike_step}", stop_at_step=5))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("train", config("run", f"spike:1000@{spike_step}"))
    assert second.returncode == 0, second.stderr[-3000:]
    # The reference: a NaN at the same step, whose update the numerics monitor drops (nan_policy=skip).
    ref = run_cli("train", config("ref", f"nan@{spike_step}", interval=0))
    assert ref.returncode == 0, ref.stderr[-3000:]

    run, reference = _records(tmp_path / "run"), _records(tmp_path / "ref")
    skipped = run[spike_step]
    assert skipped["step_skipped"] == 1 and "grad_norm" in skipped["skipped_step"], skipped
    assert [run[s]["step_skipped"] for s in range(1, steps + 1)].count(1) == 1
    assert run[steps]["steps_skipped"] == 1
    assert reference[spike_step]["step_skipped"] == 1
    for step in range(1, steps + 1):
        if step != spike_step:
            assert run[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6, abs=1e-9), step
    with open(tmp_path / "run" / "numerics.jsonl") as f:
        assert any(e["event"] == "step_skipped" and e["step"] == spike_step for e in map(json.loads, f))

    # Per-layer norms: squares add up to Megatron's own grad norm; param and update norms match the checkpoints.
    num_layers = 4
    groups = ["embedding", *(f"layer{i:02d}" for i in range(num_layers)), "final"]
    for step in (3, 8):
        record = run[step]
        total = math.sqrt(sum(record[f"norms/grad/{g}"] ** 2 for g in groups))
        assert total == pytest.approx(record["grad_norm"], rel=1e-5)
    assert all(skipped[f"norms/update/{g}"] == 0.0 for g in groups)
    ckpts = tmp_path / "run" / "checkpoints"
    last, previous = (str(ckpts / f"iter_{s:07d}") for s in (steps, steps - 1))
    params, updates = _checkpoint_norms(last, num_layers), _checkpoint_norms(last, num_layers, minus=previous)
    record = run[steps]
    for group in groups:
        assert record[f"norms/param/{group}"] == pytest.approx(params[group], rel=1e-5), group
        assert record[f"norms/update/{group}"] == pytest.approx(updates[group], rel=1e-4, abs=1e-9), group
    assert record["norms/update/layer01"] > 0
