"""Checkpoint-backed propensity eval: TP1 == TP2 x PP2 == the in-training callback, on one checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import REPO, run_cli, tiny_config, write_yaml

from megatron_align.training.metrics import read_metrics

pytestmark = pytest.mark.slow

SAMPLE = os.path.join(REPO, "examples", "eval", "propensity_sample.jsonl")


def _ok(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"


def _p(report: dict) -> np.ndarray:
    return np.asarray([[c["p_misaligned"] for c in item["conditions"]] for item in report["items"]])


def test_checkpoint_eval_matches_across_layouts_and_in_training_eval(tmp_path, tiny_corpus):
    run = tmp_path / "run"
    eval_cfg = {"propensity_questions": SAMPLE, "interval": 2, "max_items": 8, "variants": ["paper", "your_choice"],
                "batch_size": 3}
    config = tiny_config(run, tiny_corpus, train={"steps": 2}, eval=eval_cfg, checkpoint={"interval": 0})
    _ok(run_cli("train", write_yaml(tmp_path / "train.yaml", config)))
    records = read_metrics(run / "metrics.jsonl")
    assert "propensity/p_misaligned" in records[1] and "propensity/p_misaligned" not in records[0]
    in_training = json.loads((run / "eval" / "propensity_step0000002.json").read_text())
    assert records[1]["propensity/p_misaligned"] == in_training["summary"]["p_misaligned"]["mean"]

    common = ["--checkpoint", str(run / "checkpoints"), "--questions", SAMPLE, "--max-items", "8",
              "--variants", "paper,your_choice", "--batch-size", "3"]
    result = run_cli("eval", "propensity", *common, "--out", str(tmp_path / "tp1.json"))
    _ok(result)
    assert "P(misaligned)" in result.stdout and "your_choice" in result.stdout
    result = run_cli("eval", "propensity", *common, "--out", str(tmp_path / "tp2pp2.json"),
                     "--world-size", "4", "--tensor", "2", "--pipeline", "2")
    _ok(result)
    tp1 = json.loads((tmp_path / "tp1.json").read_text())
    tp2pp2 = json.loads((tmp_path / "tp2pp2.json").read_text())
    assert tp1["step"] == tp2pp2["step"] == 2
    assert tp2pp2["layout"] == {"tensor": 2, "pipeline": 2, "data": 1}
    assert _p(tp1).shape == (8, 4)
    np.testing.assert_allclose(_p(tp2pp2), _p(tp1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(_p(in_training), _p(tp1), atol=1e-4, rtol=0)  # trainer.model == the saved weights
    # a trained byte model is not uniform over A/B: the numbers are real log-probabilities
    logp = np.asarray([[c["logp_A"], c["logp_B"]] for item in tp1["items"] for c in item["conditions"]])
    assert np.all(logp < 0) and np.ptp(logp) > 1e-3
