"""Trackers against a real local MLflow store, the plain-file tracker, plots and the config."""

from __future__ import annotations

import json
import os

import pytest

from megatron_align.config import TrackingConfig, load_config
from megatron_align.errors import ConfigError
from megatron_align.tracking.backends import JsonlTracker, numeric_metrics
from megatron_align.tracking.callback import source_artifacts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mlflow_round_trip_and_reopen(tmp_path):
    pytest.importorskip("mlflow")
    from megatron_align.tracking.backends import (
        MLflowTracker,
        default_uri,
        import_mlflow,
    )

    run_dir = tmp_path / "run"
    tracker = MLflowTracker(str(run_dir), None, "exp", None, tags={"condition": "unit"})
    assert tracker.uri == default_uri(str(run_dir)) and not tracker.resumed
    tracker.log_params({"model.hidden_size": 64, "data.sources": [{"name": "web"}]})
    tracker.log_metrics(1, numeric_metrics({"step": 1, "loss": 2.5, "phase": "pretrain", "skipped": False}))
    tracker.log_metrics(2, {"loss": 2.0, "propensity/p_misaligned": 0.4})
    artifact = tmp_path / "config.yaml"
    artifact.write_text("run_dir: x\n")
    tracker.log_artifact(str(artifact), "")
    tracker.log_artifact(str(artifact), "sources/web")
    tracker.close("KILLED")
    run_id = tracker.run_id

    # a restart in the same run_dir reopens the run (from <run_dir>/tracking/mlflow_run.json)
    again = MLflowTracker(str(run_dir), None, "exp", None)
    assert again.run_id == run_id and again.resumed
    again.log_params({"model.hidden_size": 128, "train.steps": 9})  # changed value -> tag, new key -> param
    again.log_metrics(3, {"loss": 1.5})
    again.close("FINISHED")

    import_mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=default_uri(str(run_dir)))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["model.hidden_size"] == "64" and run.data.params["train.steps"] == "9"
    assert run.data.tags["changed_on_resume.model.hidden_size"] == "128" and run.data.tags["condition"] == "unit"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert client.get_metric_history(run_id, "skipped")[0].value == 0.0
    assert "phase" not in run.data.metrics
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["config.yaml", "sources"]
    assert [a.path for a in client.list_artifacts(run_id, "sources/web")] == ["sources/web/config.yaml"]
    assert run.info.artifact_uri.startswith("file://" + str(run_dir / "mlflow" / "artifacts"))
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_numeric_metrics_filters_and_sanitises():
    record = {"step": 3, "loss": 1.0, "lr": 1e-3, "skipped_step": "nan loss", "ok": True, "none": None,
              "samples/web": 12, "weird key{x}": 2.0}
    assert numeric_metrics(record) == {"loss": 1.0, "lr": 1e-3, "ok": 1.0, "samples/web": 12.0, "weird key_x_": 2.0}


def test_jsonl_tracker_writes_params_and_indexes_artifacts(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    outside = tmp_path / "manifest.json"
    outside.write_text("{}")
    inside = run_dir / "config.yaml"
    inside.write_text("a: 1\n")
    tracker = JsonlTracker(str(run_dir))
    tracker.log_params({"b": 2, "a": 1})
    tracker.log_artifact(str(outside), "sources/web")
    tracker.log_artifact(str(inside))
    tracker.close("FINISHED")
    tdir = run_dir / "tracking"
    assert json.loads((tdir / "params.json").read_text()) == {"a": 1, "b": 2}
    index = json.loads((tdir / "artifacts.json").read_text())
    assert index == {
        "sources/web/manifest.json": "tracking/artifacts/sources/web/manifest.json",
        "config.yaml": "config.yaml",
    }
    assert (tdir / "artifacts" / "sources" / "web" / "manifest.json").read_text() == "{}"
    assert json.loads((tdir / "status.json").read_text())["status"] == "FINISHED"


def test_plots_from_run_files(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_align.fileio import read_jsonl
    from megatron_align.tracking.plots import loss_curves, write_plots

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 21):
            record = {
                "step": step,
                "loss": 5 - step * 0.1,
                "lr": 1e-3,
                "phase": "pretrain" if step <= 15 else "midtrain",
                "samples/web": step * 8 - (step > 15) * (step - 15),
                "samples/aligned": (step > 15) * (step - 15),
            }
            if step % 4 == 0:
                record.update({"heldout_loss/web": 6 - step * 0.1, "heldout_loss/aligned": 7 - step * 0.1})
            if step % 5 == 0:
                record.update(
                    {
                        "propensity/misalignment_rate": 0.5 - step / 100,
                        "propensity/misalignment_rate_sem": 0.02,
                        "propensity/p_misaligned": 0.5,
                        "propensity/p_first": 0.6,
                    }
                )
            f.write(json.dumps(record) + "\n")
        f.write('{"step": 21, "loss"')  # a torn last line from a crash is ignored
    with open(run_dir / "stragglers.jsonl", "w") as f:
        for step, rank, score in [(3, 1, 2.5), (7, 3, 4.0), (7, 1, 1.5)]:
            f.write(json.dumps({"step": step, "rank": rank, "section": "forward_backward", "score": score}) + "\n")
    written = write_plots(str(run_dir))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["eval.png", "loss.png", "mixture.png", "stragglers.png"]
    curves = loss_curves(read_jsonl(str(run_dir / "metrics.jsonl")))  # what loss.png draws
    assert list(curves) == ["loss", "heldout_loss/aligned", "heldout_loss/web"]
    assert curves["loss"][0].tolist() == list(range(1, 21))
    assert curves["heldout_loss/web"][0].tolist() == [4, 8, 12, 16, 20]
    assert curves["heldout_loss/web"][1][0] == pytest.approx(5.6)
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert sorted(os.listdir(run_dir / "plots")) == names  # no temporary files left


def test_plots_skip_what_is_absent(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_align.tracking.plots import write_plots

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    assert [os.path.basename(p) for p in write_plots(str(tmp_path))] == ["loss.png"]


def test_source_artifacts_finds_manifest_and_filter_report(tmp_path):
    filtered = tmp_path / "filter"
    filtered.mkdir()
    (filtered / "kept.jsonl").write_text("{}\n")
    (filtered / "report.json").write_text("{}")
    prefix = tmp_path / "web"
    (tmp_path / "web.manifest.json").write_text(json.dumps({"inputs": [{"path": str(filtered / "kept.jsonl")}]}))
    (tmp_path / "web.skipped.jsonl").write_text("")
    config = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.mock=true"])
    config.data.sources = [type("S", (), {"name": "web", "prefix": str(prefix)})(),
                           type("S", (), {"name": "nomanifest", "prefix": str(tmp_path / "other")})()]
    found = source_artifacts(config)
    assert found == [
        (str(tmp_path / "web.manifest.json"), "sources/web"),
        (str(tmp_path / "web.skipped.jsonl"), "sources/web"),
        (str(filtered / "report.json"), "sources/web/filter"),
    ]


def test_tracking_config_validation():
    assert TrackingConfig().backends == []
    assert TrackingConfig(backend="none").backends == [] and TrackingConfig(backend="wandb").backends == ["wandb"]
    with pytest.raises(ConfigError, match="tracking.backend='comet'"):
        TrackingConfig(backend="comet")
    with pytest.raises(ConfigError, match="tracking.backends: 'comet' is not one of"):
        TrackingConfig(backends=["mlflow", "comet"])
    with pytest.raises(ConfigError, match="listed twice"):
        TrackingConfig(backends=["wandb", "wandb"])
    with pytest.raises(ConfigError, match="set only tracking.backends"):
        TrackingConfig(backend="mlflow", backends=["wandb"])
    with pytest.raises(ConfigError, match=r"tracking.uri is set but tracking.backends=\['jsonl'\] has no mlflow"):
        TrackingConfig(backend="jsonl", uri="http://x:5000")
    config = load_config(None, ["tracking.backend=mlflow", "tracking.experiment=e1", "tracking.tags.condition=x"])
    assert config.tracking.tags == {"condition": "x"} and config.tracking.uri is None
    assert config.tracking.backends == ["mlflow"] and config.tracking.backend is None
    config = load_config(None, ["tracking.backends=[tensorboard,wandb]"])
    assert config.tracking.backends == ["tensorboard", "wandb"]
