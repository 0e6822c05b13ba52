"""The tracking callback: rank 0 mirrors the run into its trackers (MLflow, plain files, TensorBoard, W&B).

What is logged, and when:

- train start: params (the flattened resolved config, ``model.hidden_size`` ...), tags (layout,
  world size, version), artifacts ``config.yaml`` and, for every ``data.sources`` entry, its
  ``<prefix>.manifest.json`` / ``.skipped.jsonl`` (from ``prepare``) and a filter ``report.json``
  found next to a manifest input (from ``filter``) under ``sources/<name>/``;
- each step that metrics.jsonl records: every numeric value of the record, at that step
  (queued, so the loop does not wait on the store); new eval reports under ``eval/``;
- each checkpoint: queued metrics are flushed (what a resume continues from is in the store);
- train end: plots (``<run_dir>/plots/*.png``) under ``plots/``, and the run's status
  (FINISHED when train.steps were reached, KILLED for an early stop that will resume,
  FAILED from ``on_error``).

Tracking never stops training after it has started: a failing store logs a warning and the
run goes on (metrics.jsonl remains the record). A store that cannot be opened at start fails
the job with the store's error, before step 1.
"""

from __future__ import annotations

import glob
import logging
import os

from megatron_align.config import RootConfig
from megatron_align.errors import ConfigError
from megatron_align.training.callbacks import Callback

log = logging.getLogger(__name__)

_MAX_SIDE_FILE_BYTES = 20 * 2**20  # skip huge .skipped.jsonl side files


def source_artifacts(config) -> list[tuple[str, str]]:
    """(path, artifact subdir) of every prepare manifest / skipped report / filter report of the sources."""
    import json

    found: list[tuple[str, str]] = []
    for source in config.data.sources:
        subdir = f"sources/{source.name}"
        manifest = f"{source.prefix}.manifest.json"
        if not os.path.isfile(manifest):
            continue
        found.append((manifest, subdir))
        skipped = f"{source.prefix}.skipped.jsonl"
        if os.path.isfile(skipped) and os.path.getsize(skipped) <= _MAX_SIDE_FILE_BYTES:
            found.append((skipped, subdir))
        try:
            with open(manifest) as f:
                inputs = [i.get("path", "") for i in json.load(f).get("inputs", [])]
        except (OSError, ValueError, AttributeError):
            inputs = []
        for report in sorted({os.path.join(os.path.dirname(p), "report.json") for p in inputs if p}):
            if os.path.isfile(report):
                found.append((report, f"{subdir}/filter"))
    return found


class TrackingCallback(Callback):
    name = "tracking"
    priority = 100  # last: it logs the record after every other callback has added its keys

    def __init__(self, config: RootConfig) -> None:
        self.config = config
        self.cfg = config.tracking
        self.tracker = None
        self._saved_state: dict = {}
        self._logged_reports: set[str] = set()
        self._failures = 0
        t = config.train
        self._last_step = min(t.steps, t.stop_at_step or t.steps)

    # -- checkpointed state (the MLflow run id survives restarts with the checkpoint, too)
    def state_dict(self) -> dict:
        return dict(self._saved_state)

    def load_state_dict(self, state: dict) -> None:
        self._saved_state = dict(state or {})

    # -- hooks (rank 0 only)
    def _open(self, start_step: int):
        from megatron_align.tracking import backends as b

        run_dir, cfg = self.config.run_dir, self.cfg
        opened = []
        try:
            for name in cfg.backends:
                if name == "mlflow":
                    opened.append(b.MLflowTracker(run_dir, cfg.uri, cfg.experiment, cfg.run_name, cfg.tags,
                                                  self._saved_state))
                elif name == "tensorboard":
                    opened.append(b.TensorBoardTracker(run_dir, start_step))
                elif name == "wandb":
                    opened.append(b.WandbTracker(run_dir, cfg.experiment, cfg.run_name, cfg.tags, self._saved_state))
                else:
                    opened.append(b.JsonlTracker(run_dir, self._saved_state))
        except BaseException:
            for tracker in opened:  # the job stops before step 1: do not leave the others running
                tracker.close("FAILED")
            raise
        return b.Trackers(opened)

    def on_train_start(self, trainer) -> None:
        self._open_on_rank0(trainer)
        if trainer.rank != 0:
            return
        from megatron_align.config.loader import config_to_dict, flatten

        layout = trainer.layout
        self._guard("params", lambda: (
            self.tracker.log_params(flatten(config_to_dict(self.config))),
            self.tracker.set_tags({
                "layout": f"TP{layout.tensor} PP{layout.pipeline} CP{layout.context} "
                          f"VPP{layout.virtual_pipeline or 1} DP{layout.data}",
                "world_size": layout.world_size, "megatron_align.version": _version(),
                **({"resumed_at_step": trainer.step} if trainer.step else {})})))
        if self.cfg.artifacts:
            config_yaml = os.path.join(trainer.run_dir, "config.yaml")
            files = ([(config_yaml, "")] if os.path.isfile(config_yaml) else []) + source_artifacts(self.config)
            for path, subdir in files:
                self._guard(f"artifact {path}", lambda p=path, s=subdir: self.tracker.log_artifact(p, s))

    def _open_on_rank0(self, trainer) -> None:
        """Rank 0 opens the store; every rank learns the run id (checkpoints hold the same state on all ranks)
        or the error (so all ranks stop together, before step 1: the user asked for this store)."""
        import torch

        from megatron_align.errors import UserError

        message: dict = {}
        if trainer.rank == 0:
            try:
                self.tracker = self._open(trainer.step)
                message = {"state": self.tracker.state()}
            except UserError as err:
                message = {"error": str(err)}
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            box = [message]
            torch.distributed.broadcast_object_list(box, src=0)
            message = box[0]
        if "error" in message:
            raise UserError(message["error"])
        self._saved_state = message["state"]

    def on_step_end(self, trainer, step: int, record: dict) -> None:
        if self.tracker is None:
            return
        if step % self.config.logging.interval == 0 or step == self._last_step:
            from megatron_align.tracking.backends import numeric_metrics

            self._guard("metrics", lambda: self.tracker.log_metrics(step, numeric_metrics(record)))
        if self.cfg.artifacts and any(k.startswith("propensity/") for k in record):
            self._log_new_reports()

    def on_checkpoint_saved(self, trainer, step: int) -> None:
        if self.tracker is not None:
            self._guard("flush", self.tracker.flush)

    def on_train_end(self, trainer) -> None:
        if self.tracker is None:
            return
        if self.cfg.plots:
            self._guard("plots", lambda: self._plots(trainer.run_dir))
        if self.cfg.artifacts:
            self._log_new_reports()
        status = "FINISHED" if trainer.step >= self.config.train.steps else "KILLED"
        self._guard("close", lambda: self.tracker.close(status))
        self.tracker = None

    def on_error(self, trainer, error: BaseException) -> None:
        if self.tracker is not None:
            self._guard("close", lambda: self.tracker.close("FAILED"))
            self.tracker = None

    # -- helpers
    def _plots(self, run_dir: str) -> None:
        from megatron_align.optional import optional_import

        if optional_import("matplotlib") is None:
            log.warning("tracking.plots: matplotlib is not installed; no plots (pip install matplotlib)")
            return
        from megatron_align.tracking.plots import write_plots

        for path in write_plots(run_dir):
            if self.cfg.artifacts:
                self.tracker.log_artifact(path, "plots")

    def _log_new_reports(self) -> None:
        eval_dir = self.config.eval.out_dir or os.path.join(self.config.run_dir, "eval")
        for path in sorted(glob.glob(os.path.join(eval_dir, "*.json"))):
            if path not in self._logged_reports:
                self._logged_reports.add(path)
                self._guard(f"artifact {path}", lambda p=path: self.tracker.log_artifact(p, "eval"))

    def _guard(self, what: str, action) -> None:
        """Run a tracking action; a failure is logged (a few times) and never stops training."""
        try:
            action()
        except Exception as err:  # the store, the network, a full disk: training goes on
            self._failures += 1
            if self._failures <= 5:
                log.warning("tracking (%s) failed: %s: %s%s", what, type(err).__name__, err,
                            "; further failures are not reported" if self._failures == 5 else "")


def _version() -> str:
    from megatron_align import __version__

    return __version__


def build_callbacks(config: RootConfig) -> list[Callback]:
    """Trainer callbacks for this area, from the root config (empty when tracking.backends is empty)."""
    if not config.tracking.backends:
        return []
    import importlib.util

    if "mlflow" in config.tracking.backends:
        if importlib.util.find_spec("mlflow") is None:  # checked without importing it (slow, and telemetry)
            raise ConfigError("tracking.backends has mlflow but it is not installed: pip install mlflow-skinny "
                              "sqlalchemy alembic (the embedded SQLite store needs the last two), or use "
                              "tracking.backends: [jsonl]")
    for name in ("tensorboard", "wandb"):
        if name in config.tracking.backends and importlib.util.find_spec(name) is None:
            raise ConfigError(f"tracking.backends has {name} but it is not installed: pip install {name} "
                              "(the tracking extra)")
    return [TrackingCallback(config)]
