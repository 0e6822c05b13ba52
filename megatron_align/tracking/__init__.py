"""megatron_align.tracking: MLflow (embedded store by default) or plain-file tracking, and run plots.

:mod:`.backends` holds the trackers, :mod:`.callback` the training callback, :mod:`.plots` the
plots drawn from a run dir's files.
"""

from __future__ import annotations


def build_callbacks(config) -> list:
    """Trainer callbacks for this area, from the root config (empty when tracking.backend=none)."""
    if config.tracking.backend == "none":
        return []
    if config.tracking.backend == "mlflow":
        import importlib.util

        from megatron_align.errors import ConfigError

        if importlib.util.find_spec("mlflow") is None:  # checked without importing it (slow, and telemetry)
            raise ConfigError("tracking.backend=mlflow but mlflow is not installed: pip install mlflow-skinny "
                              "sqlalchemy alembic (the embedded SQLite store needs the last two), or use "
                              "tracking.backend=jsonl")
    from megatron_align.tracking.callback import TrackingCallback

    return [TrackingCallback(config)]
