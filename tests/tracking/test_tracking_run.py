"""A real 2-rank training job with MLflow, TensorBoard and (offline) W&B tracking and the in-training eval,
stopped and resumed (and profiling one of its ranks for a step)."""

from __future__ import annotations

import glob
import json
import os
import struct

import pytest
from conftest import REPO, run_cli, tiny_config, write_yaml

from megatron_align.training.metrics import read_metrics

pytestmark = pytest.mark.slow

SAMPLE = os.path.join(REPO, "examples", "eval", "propensity_sample.jsonl")


def wandb_records(run_dir):
    """Every record of the offline W&B runs under run_dir, oldest run first. The .wandb file is W&B's
    LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        with open(path, "rb") as f:
            data = f.read()
        assert data[:4] == b":W&B"
        pos, chunks = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # block trailer padding
                pos += 32768 - pos % 32768
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # FULL or LAST chunk
                record = pb.Record()
                record.ParseFromString(chunks)
                chunks = b""
                yield record


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def _ok(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"


@pytest.mark.single_stack  # base stack only: MLflow tracking code, no megatron-core version dependence
def test_resumed_run_continues_the_tracking_runs_with_eval_metrics(tmp_path, tiny_corpus):
    for module in ("mlflow", "tensorboard", "wandb"):
        pytest.importorskip(module)
    run = tmp_path / "run"
    config = tiny_config(run, tiny_corpus, parallel={"world_size": 2}, checkpoint={"interval": 0},
                         eval={"propensity_questions": SAMPLE, "interval": 2, "max_items": 4, "variants": ["paper"]},
                         tracking={"backends": ["mlflow", "tensorboard", "wandb"], "experiment": "tests",
                                   "tags": {"condition": "unit"}},
                         # and the profiler on one rank only (step 3, after the resume): the other is not held up
                         profile={"mode": "torch", "ranks": [1], "start_step": 3, "end_step": 3})
    path = write_yaml(tmp_path / "train.yaml", config)
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_DIR": "", "WANDB_SILENT": "true"}
    first = run_cli("train", path, "train.stop_at_step=2", env=env)
    _ok(first)
    run_file = run / "tracking" / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"]
    wandb_id = json.loads((run / "tracking" / "wandb_run.json").read_text())["run_id"]
    assert "(new)" in first.stdout and f"W&B run {wandb_id} (new)" in first.stdout
    second = run_cli("train", path, env=env)
    _ok(second)
    assert "resumed from" in second.stdout and f"MLflow run {run_id} (resumed)" in second.stdout
    assert f"W&B run {wandb_id} (resumed)" in second.stdout
    assert json.loads(run_file.read_text())["run_id"] == run_id
    assert os.listdir(run / "profile") == ["rank1_steps3-3.trace.json"]
    assert "ma/step_3" in (run / "profile" / "rank1_steps3-3.trace.json").read_text()

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
    check_tensorboard_and_wandb(run, records, wandb_id)


def check_tensorboard_and_wandb(run, records: dict, wandb_id: str) -> None:
    # TensorBoard: the same points, read back as TensorBoard reads them; the config as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == \
        [(s, pytest.approx(records[s]["loss"], rel=1e-6)) for s in (1, 2, 3, 4)]
    assert [e.step for e in events.Scalars("propensity/p_misaligned")] == [2, 4]
    assert "config/text_summary" in events.Tags()["tensors"]
    config_text = b"".join(t.tensor_proto.string_val[0] for t in events.Tensors("config/text_summary")).decode()
    assert "| model.hidden_size | 64 |" in config_text

    # W&B offline: one run id across both attempts, every step's metrics, the flattened config
    history, wandb_config, ids = {}, {}, set()
    for record in wandb_records(str(run)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.add(record.run.run_id)
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        elif kind == "history":
            point = {_key(i): json.loads(i.value_json) for i in record.history.item}
            if "_step" in point:
                history[point["_step"]] = point
            continue
        else:
            continue
        wandb_config.update({_key(i): json.loads(i.value_json) for i in items})
    assert ids == {wandb_id}
    assert sorted(history) == [1, 2, 3, 4]
    assert [history[s]["loss"] for s in (1, 2, 3, 4)] == [pytest.approx(records[s]["loss"]) for s in (1, 2, 3, 4)]
    assert [s for s in history if "propensity/p_misaligned" in history[s]] == [2, 4]
    assert wandb_config["model.hidden_size"] == 64 and wandb_config["parallel.world_size"] == 2
    assert wandb_config["tags.condition"] == "unit"
