"""The MLflow UI the docs point to opens: a real `mlflow ui` server on 127.0.0.1 over a demo-style store.

The runs, params and metrics come back through the server's REST API, and the experiment page,
rendered by headless Chromium (Debian's `chromium`), shows the run names. Skips only when the
`mlflow` server package or chromium is absent, saying which.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest

pytest.importorskip(
    "mlflow.server", reason="the MLflow UI needs the full `mlflow` package (pip install -e '.[tracking]')"
)
pytest.importorskip("flask", reason="the MLflow UI needs flask (full `mlflow` package)")

from conftest import http_server  # noqa: E402

from megatron_align.tracking.backends import MLflowTracker  # noqa: E402

RUNS = {"unfiltered_s0": 0.61, "aligned_s0": 0.43}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(tmp_path) -> str:
    uri = "sqlite:///" + str(tmp_path / "mlflow" / "mlflow.db")
    for name, rate in RUNS.items():
        tracker = MLflowTracker(str(tmp_path / "runs" / name), uri, "megatron_align_demo", name,
                                tags={"condition": name.split("_")[0]})
        tracker.log_params({"train.steps": "600", "condition": name.split("_")[0]})
        tracker.log_metrics(600, {"propensity/misalignment_rate": rate, "loss": 3.2})
        tracker.close("FINISHED")
    return uri


def _api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def mlflow_server(tmp_path):
    uri = _store(tmp_path)
    port = _free_port()
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    base = f"http://127.0.0.1:{port}"
    command = [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
               # one worker: uvicorn's supervisor kills workers that miss its ping on a loaded box
               "--workers", "1"]
    with http_server(command, base + "/health", tmp_path / "server.log",
                     env={"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}):
        yield base


@pytest.mark.slow
def test_mlflow_ui_serves_runs_and_renders_them(mlflow_server, tmp_path):
    experiment = _api(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=megatron_align_demo")
    experiment_id = experiment["experiment"]["experiment_id"]
    runs = _api(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    assert set(by_name) == set(RUNS)
    for name, rate in RUNS.items():
        data = by_name[name]["data"]
        assert {p["key"]: p["value"] for p in data["params"]}["train.steps"] == "600"
        assert {m["key"]: m["value"] for m in data["metrics"]}["propensity/misalignment_rate"] == pytest.approx(rate)
    history = _api(
        mlflow_server,
        f"/api/2.0/mlflow/metrics/get-history?run_id={by_name['aligned_s0']['info']['run_id']}&metric_key=loss",
    )
    assert [(m["step"], m["value"]) for m in history["metrics"]] == [(600, 3.2)]

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it): REST checks passed, "
                    "the rendered-page check did not run")
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=60000", "--dump-dom",
         f"{mlflow_server}/#/experiments/{experiment_id}/runs"],
        capture_output=True, text=True, timeout=300)
    assert dom.returncode == 0, dom.stderr[-3000:]
    for name in RUNS:
        assert name in dom.stdout, f"run {name} not in the rendered experiment page ({len(dom.stdout)} chars of DOM)"
