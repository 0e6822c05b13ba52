"""A real 2-rank training job with MLflow tracking and the in-training eval, stopped and resumed."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, run_cli, tiny_config, write_yaml

from megatron_align.training.metrics import read_metrics

pytestmark = pytest.mark.slow

SAMPLE = os.path.join(REPO, "examples", "eval", "propensity_sample.jsonl")


def _ok(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"


@pytest.mark.single_stack  # base stack only: MLflow tracking code, no megatron-core version dependence
def test_resumed_run_continues_the_mlflow_run_with_eval_metrics(tmp_path, tiny_corpus):
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    config = tiny_config(run, tiny_corpus, parallel={"world_size": 2}, checkpoint={"interval": 0},
                         eval={"propensity_questions": SAMPLE, "interval": 2, "max_items": 4, "variants": ["paper"]},
                         tracking={"backend": "mlflow", "experiment": "tests", "tags": {"condition": "unit"}})
    path = write_yaml(tmp_path / "train.yaml", config)
    first = run_cli("train", path, "train.stop_at_step=2")
    _ok(first)
    run_file = run / "tracking" / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"]
    assert "(new)" in first.stdout
    second = run_cli("train", path)
    _ok(second)
    assert "resumed from" in second.stdout and f"MLflow run {run_id} (resumed)" in second.stdout
    assert json.loads(run_file.read_text())["run_id"] == run_id

    records = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(records) == [1, 2, 3, 4]
    assert [s for s, r in records.items() if "propensity/misalignment_rate" in r] == [2, 4]
    assert 0 < records[4]["propensity/p_misaligned"] < 1 and "propensity/p_first_sem" in records[4]
    assert sorted(os.listdir(run / "eval")) == ["propensity_step0000002.json", "propensity_step0000004.json"]

    from megatron_align.tracking.backends import default_uri, import_mlflow

    import_mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=default_uri(str(run)))
    experiment = client.get_experiment_by_name("tests")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["model.hidden_size"] == "64" and mlrun.data.params["parallel.world_size"] == "2"
    assert mlrun.data.tags["condition"] == "unit" and mlrun.data.tags["resumed_at_step"] == "2"
    assert mlrun.data.tags["layout"] == "TP1 PP1 CP1 VPP1 DP2"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == \
        [(s, records[s]["loss"]) for s in (1, 2, 3, 4)]
    assert [m.step for m in client.get_metric_history(run_id, "propensity/p_misaligned")] == [2, 4]
    artifacts = {a.path for top in ("", "eval", "plots") for a in client.list_artifacts(run_id, top or None)}
    assert {"config.yaml", "eval/propensity_step0000002.json", "eval/propensity_step0000004.json",
            "plots/loss.png", "plots/eval.png"} <= artifacts
    assert sorted(os.listdir(run / "plots")) == ["eval.png", "loss.png"]
