"""Tracker backends: MLflow (embedded store by default) and plain files.

A tracker is the small surface the training callback needs: ``log_params``, ``log_metrics``,
``log_artifact``, ``flush`` and ``close``; only rank 0 ever holds one.

**The embedded MLflow default.** With ``tracking.uri`` unset the store is a SQLite file under the
run dir (``<run_dir>/mlflow/mlflow.db``, artifacts in ``<run_dir>/mlflow/artifacts``): MLflow's own
recommended local backend (its file store is in maintenance mode and refuses to start unless
opted in), read by ``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow/mlflow.db`` or the
Python client. MLflow's usage telemetry is switched off before mlflow is first imported
(``MLFLOW_DISABLE_TELEMETRY``/``DO_NOT_TRACK``, unless the user set them), so nothing leaves the
machine unless ``tracking.uri`` names a server.

**Resume continues the run.** The run id is written to ``<run_dir>/tracking/mlflow_run.json`` when
the run is created (and kept in the callback's checkpoint state); a restarted job reopens that run,
sets it back to RUNNING, logs params it has not seen and records changed values as
``changed_on_resume.<key>`` tags (MLflow params are immutable). Metric points of steps that are
recomputed after a restart appear twice in MLflow's history (MLflow cannot delete points);
metrics.jsonl, which the trainer truncates on resume, is the exact record.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from typing import Optional

from megatron_align.errors import UserError

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
_MAX_PARAM_LENGTH = 6000  # MLflow 3's limit on a param value
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-./ :]")


def tracking_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "tracking")


def _atomic_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def import_mlflow():
    """mlflow, imported with its usage telemetry off (it phones home by default)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    already = "mlflow" in sys.modules
    from megatron_align.optional import require

    mlflow = require("mlflow", "tracking.backend=mlflow")
    if already:  # imported before the variables were set (e.g. by `doctor`): drop its telemetry client now
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return mlflow


def default_uri(run_dir: str) -> str:
    return "sqlite:///" + os.path.join(os.path.abspath(run_dir), "mlflow", "mlflow.db")


def _local_artifact_root(uri: str) -> Optional[str]:
    """For a local store, artifacts live next to it; a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])), "artifacts")
    if uri.startswith("file:") or "://" not in uri:
        return None  # MLflow's file store keeps artifacts inside its own directory tree
    return None


def metric_key(key: str) -> str:
    return _KEY_BAD_CHARS.sub("_", key)


def numeric_metrics(record: dict) -> dict[str, float]:
    """Numeric values of a metrics record (bools as 0/1), keys made MLflow-safe; ``step`` itself excluded."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, str) or value is None:
            continue
        if isinstance(value, (bool, int, float)):
            out[metric_key(key)] = float(value)
    return out


class JsonlTracker:
    """No dependencies: params to ``<run_dir>/tracking/params.json``, artifacts indexed (and copied when
    they live outside the run dir) under ``<run_dir>/tracking/``. Metrics are metrics.jsonl itself."""

    backend = "jsonl"

    def __init__(self, run_dir: str, state: Optional[dict] = None) -> None:
        self.run_dir = run_dir
        self.dir = tracking_dir(run_dir)
        self.run_id = "jsonl"
        self._index_path = os.path.join(self.dir, "artifacts.json")
        self._index: dict[str, str] = {}
        if os.path.isfile(self._index_path):
            with open(self._index_path) as f:
                self._index = json.load(f)

    def state(self) -> dict:
        return {}

    def log_params(self, params: dict[str, object]) -> None:
        _atomic_json(os.path.join(self.dir, "params.json"), {k: params[k] for k in sorted(params)})

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """metrics.jsonl already holds every record."""

    def log_artifact(self, path: str, subdir: str = "") -> None:
        run_dir = os.path.abspath(self.run_dir)
        src = os.path.abspath(path)
        name = os.path.join(subdir, os.path.basename(path)) if subdir else os.path.basename(path)
        if not src.startswith(run_dir + os.sep):
            dest = os.path.join(self.dir, "artifacts", name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(src, dest + ".tmp")
            os.replace(dest + ".tmp", dest)
            src = dest
        self._index[name] = os.path.relpath(src, run_dir)
        _atomic_json(self._index_path, self._index)

    def flush(self) -> None: ...

    def close(self, status: str) -> None:
        _atomic_json(os.path.join(self.dir, "status.json"), {"status": status, "time": time.time()})


def ensure_experiment(client, uri: str, name: str) -> str:
    """The id of MLflow experiment ``name``, created (artifacts beside a local store) if missing."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_local_artifact_root(uri))
    except MlflowException:  # created concurrently by another run sharing the store
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class MLflowTracker:
    """One MLflow run per run_dir, created or reopened (see module docstring)."""

    backend = "mlflow"

    def __init__(self, run_dir: str, uri: Optional[str], experiment: str, run_name: Optional[str],
                 tags: Optional[dict] = None, state: Optional[dict] = None) -> None:
        import_mlflow()
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.run_dir = run_dir
        self.uri = uri or default_uri(run_dir)
        if self.uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(os.path.abspath(self.uri[len("sqlite:///"):])), exist_ok=True)
        self._pending: list = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # SQLAlchemy deprecations inside MLflow
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = ensure_experiment(self.client, self.uri, experiment)
                self.run_id, self.resumed = self._open_run(experiment, run_name or os.path.basename(os.path.abspath(run_dir)),
                                                           tags or {}, state or {})
        except MlflowException as err:
            raise UserError(f"tracking.uri={self.uri}: MLflow failed: {err.message}") from None
        _atomic_json(os.path.join(tracking_dir(run_dir), RUN_FILE),
                     {"run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": experiment,
                      "tracking_uri": self.uri})
        log.info("MLflow run %s (%s) in %s", self.run_id, "resumed" if self.resumed else "new", self.uri)

    def _previous_run_id(self, state: dict) -> Optional[str]:
        path = os.path.join(tracking_dir(self.run_dir), RUN_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("tracking_uri") == self.uri:
                return saved.get("run_id")
        if state.get("run_id") and state.get("tracking_uri") == self.uri and \
                state.get("run_dir") == os.path.abspath(self.run_dir):
            return state["run_id"]
        return None

    def _open_run(self, experiment: str, run_name: str, tags: dict, state: dict) -> tuple[str, bool]:
        from mlflow.exceptions import MlflowException

        previous = self._previous_run_id(state)
        if previous:
            try:
                run = self.client.get_run(previous)
                if run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id:
                    self.client.update_run(previous, status="RUNNING")
                    return previous, True
            except MlflowException:
                pass
            log.warning("MLflow run %s of %s is gone from %s (deleted or another store); starting a new run",
                        previous, self.run_dir, self.uri)
        tags = {"megatron_align.run_dir": os.path.abspath(self.run_dir), **{k: str(v) for k, v in tags.items()}}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id, False

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "run_dir": os.path.abspath(self.run_dir)}

    def log_params(self, params: dict[str, object]) -> None:
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(self.run_id).data.params
        new, changed = [], []
        for key, value in params.items():
            text = str(value)[:_MAX_PARAM_LENGTH]
            key = metric_key(key)
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text:
                changed.append(RunTag(f"changed_on_resume.{key}", text[:5000]))
        for start in range(0, len(new), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=new[start:start + 100])
        for start in range(0, len(changed), 100):
            self.client.log_batch(self.run_id, tags=changed[start:start + 100])

    def set_tags(self, tags: dict[str, object]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(metric_key(k), str(v)) for k, v in tags.items()])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queued (MLflow's async logging), so rank 0 does not wait on the store every step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self._pending.append(self.client.log_batch(self.run_id, metrics=batch[start:start + 1000], synchronous=False))

    def log_artifact(self, path: str, subdir: str = "") -> None:
        self.client.log_artifact(self.run_id, path, artifact_path=subdir or None)

    def flush(self) -> None:
        """Wait until every queued metric is in the store."""
        pending, self._pending = self._pending, []
        for operation in pending:
            if operation is not None:
                operation.wait()

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def log_finished_run(uri: str, experiment: str, run_name: str, *, params: dict[str, object],
                     metrics: dict[str, float], artifacts: list[str], tags: Optional[dict] = None,
                     run_dir: Optional[str] = None) -> str:
    """Log a result that is already computed (an eval report, the demo's table) as one finished MLflow run.

    Params, metrics (at step 0) and the files in ``artifacts`` that exist; returns the run id. ``run_dir``
    keeps the run's ``tracking/mlflow_run.json`` (so the same ``run_dir`` reopens its run); None = a fresh
    run every call. A failure while logging marks the run FAILED and is raised.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="megatron_align_run_") as scratch:
        tracker = MLflowTracker(run_dir or scratch, uri, experiment, run_name, tags=tags)
        try:
            tracker.log_params(params)
            tracker.log_metrics(0, numeric_metrics(metrics))
            for path in artifacts:
                if os.path.exists(path):
                    tracker.log_artifact(path)
        except BaseException:
            tracker.close("FAILED")
            raise
        tracker.close("FINISHED")
        return tracker.run_id
