"""Tracker backends: MLflow (embedded store by default), plain files, TensorBoard and Weights & Biases.

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

**TensorBoard and W&B** get the same metrics at the same steps and the flattened config. TensorBoard
writes ``<run_dir>/tensorboard/`` (a resumed run purges the events after its resume step, so recomputed
steps are not drawn twice); W&B writes ``<run_dir>/wandb/`` and reopens its run id on resume (kept in
``<run_dir>/tracking/wandb_run.json`` and the checkpoint; W&B drops points at steps it already has).
W&B reads its mode, API key and entity from the environment (``WANDB_MODE=offline`` needs no network;
``wandb sync <run_dir>/wandb/offline-run-*`` uploads later). Artifacts go to MLflow / the run dir only.
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

from megatron_align.errors import UserError
from megatron_align.fileio import atomic_open, atomic_write_json

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
_MAX_PARAM_LENGTH = 6000  # MLflow 3's limit on a param value
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-./ :]")


def tracking_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "tracking")


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_json(path, data, indent=1, default=str)


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


def _local_artifact_root(uri: str) -> str | None:
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

    def __init__(self, run_dir: str, state: dict | None = None) -> None:
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
        _write_json(os.path.join(self.dir, "params.json"), {k: params[k] for k in sorted(params)})

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """metrics.jsonl already holds every record."""

    def log_artifact(self, path: str, subdir: str = "") -> None:
        run_dir = os.path.abspath(self.run_dir)
        src = os.path.abspath(path)
        name = os.path.join(subdir, os.path.basename(path)) if subdir else os.path.basename(path)
        if not src.startswith(run_dir + os.sep):
            dest = os.path.join(self.dir, "artifacts", name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with atomic_open(dest, "wb") as f, open(src, "rb") as source:
                shutil.copyfileobj(source, f)
            src = dest
        self._index[name] = os.path.relpath(src, run_dir)
        _write_json(self._index_path, self._index)

    def flush(self) -> None: ...

    def close(self, status: str) -> None:
        _write_json(os.path.join(self.dir, "status.json"), {"status": status, "time": time.time()})


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

    def __init__(self, run_dir: str, uri: str | None, experiment: str, run_name: str | None,
                 tags: dict | None = None, state: dict | None = None) -> None:
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
                self.run_id, self.resumed = self._open_run(
                    experiment, run_name or os.path.basename(os.path.abspath(run_dir)), tags or {}, state or {}
                )
        except MlflowException as err:
            raise UserError(f"tracking.uri={self.uri}: MLflow failed: {err.message}") from None
        _write_json(os.path.join(tracking_dir(run_dir), RUN_FILE),
                     {"run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": experiment,
                      "tracking_uri": self.uri})
        log.info("MLflow run %s (%s) in %s", self.run_id, "resumed" if self.resumed else "new", self.uri)

    def _previous_run_id(self, state: dict) -> str | None:
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
            self._pending.append(
                self.client.log_batch(self.run_id, metrics=batch[start : start + 1000], synchronous=False)
            )

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


def _markdown_table(items: dict[str, object]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {str(v)[:500]} |" for k, v in sorted(items.items()))


class TensorBoardTracker:
    """Event files under ``<run_dir>/tensorboard`` (torch's SummaryWriter; needs the tensorboard package)."""

    backend = "tensorboard"

    def __init__(self, run_dir: str, start_step: int = 0) -> None:
        from megatron_align.optional import require

        require("tensorboard", "tracking.backends: tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.dir = os.path.join(run_dir, "tensorboard")
        # On resume, events after the resume step (written before a crash, recomputed now) are purged.
        self.writer = SummaryWriter(log_dir=self.dir, purge_step=start_step + 1 if start_step else None)
        self._step = start_step

    def state(self) -> dict:
        return {}

    def log_params(self, params: dict[str, object]) -> None:
        self.writer.add_text("config", _markdown_table(params), self._step)

    def set_tags(self, tags: dict[str, object]) -> None:
        self.writer.add_text("tags", _markdown_table(tags), self._step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: str, subdir: str = "") -> None:
        """Artifacts stay in the run dir (and MLflow)."""

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


WANDB_RUN_FILE = "wandb_run.json"


class WandbTracker:
    """One W&B run per run_dir, files under ``<run_dir>/wandb``, reopened on resume (see module docstring)."""

    backend = "wandb"

    def __init__(self, run_dir: str, project: str, run_name: str | None, tags: dict | None = None,
                 state: dict | None = None) -> None:
        from megatron_align.optional import require

        wandb = require("wandb", "tracking.backends: wandb")
        self.run_dir = run_dir
        run_file = os.path.join(tracking_dir(run_dir), WANDB_RUN_FILE)
        previous = (state or {}).get("wandb_run_id")
        if os.path.isfile(run_file):
            with open(run_file) as f:
                previous = json.load(f).get("run_id") or previous
        try:
            self.run = wandb.init(
                project=project, name=run_name or os.path.basename(os.path.abspath(run_dir)),
                dir=os.path.abspath(run_dir), id=previous, resume="allow" if previous else None,
                config={f"tags.{k}": v for k, v in (tags or {}).items()},
                settings=wandb.Settings(silent=True, console="off", disable_git=True, save_code=False))
        except Exception as err:  # no API key / no network in online mode, a bad entity ...
            raise UserError(f"tracking.backends: wandb could not start a run ({type(err).__name__}: {err}); "
                            "set WANDB_API_KEY (online) or WANDB_MODE=offline (no network; wandb sync later)") \
                from None
        self.run_id = self.run.id
        _write_json(run_file, {"run_id": self.run_id, "project": project, "mode": str(self.run.settings.mode)})
        log.info("W&B run %s (%s) in %s", self.run_id, "resumed" if previous else "new", self.run.dir)

    def state(self) -> dict:
        return {"wandb_run_id": self.run_id}

    def log_params(self, params: dict[str, object]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def set_tags(self, tags: dict[str, object]) -> None:
        self.run.config.update({f"tags.{k}": v for k, v in tags.items()}, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_artifact(self, path: str, subdir: str = "") -> None:
        """Artifacts stay in the run dir (and MLflow)."""

    def flush(self) -> None:
        """W&B's service process writes in the background."""

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status in ("FINISHED", "KILLED") else 1)


class Trackers:
    """Several trackers behind the one tracker surface; each call goes to every tracker, and a failure of one
    does not keep the others from their share (the first error is raised afterwards)."""

    def __init__(self, trackers: list) -> None:
        self.trackers = trackers

    def _each(self, method: str, *args) -> None:
        first = None
        for tracker in self.trackers:
            action = getattr(tracker, method, None)
            if action is None:
                continue
            try:
                action(*args)
            except Exception as err:
                first = first or err
        if first is not None:
            raise first

    def state(self) -> dict:
        return {k: v for tracker in self.trackers for k, v in tracker.state().items()}

    def log_params(self, params: dict[str, object]) -> None:
        self._each("log_params", params)

    def set_tags(self, tags: dict[str, object]) -> None:
        self._each("set_tags", tags)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._each("log_metrics", step, metrics)

    def log_artifact(self, path: str, subdir: str = "") -> None:
        self._each("log_artifact", path, subdir)

    def flush(self) -> None:
        self._each("flush")

    def close(self, status: str) -> None:
        self._each("close", status)


def log_finished_run(uri: str, experiment: str, run_name: str, *, params: dict[str, object],
                     metrics: dict[str, float], artifacts: list[str], tags: dict | None = None,
                     run_dir: str | None = None) -> str:
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
