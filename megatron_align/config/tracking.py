"""Experiment tracking (``tracking:``): which backend :mod:`megatron_align.tracking` logs a run to, and what."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_align.errors import ConfigError

BACKENDS = ("mlflow", "jsonl", "tensorboard", "wandb")


@dataclass
class TrackingConfig:
    backends: list[str] = field(default_factory=list)
    """Any of mlflow (an MLflow run; embedded local store by default), jsonl (params.json + plots next to
    metrics.jsonl, no dependency), tensorboard (event files in <run_dir>/tensorboard), wandb (a Weights &
    Biases run; files in <run_dir>/wandb; WANDB_MODE=offline needs no network, the API key comes from
    WANDB_API_KEY, never from this file). Each gets the same metrics and run config. [] = nothing beyond
    metrics.jsonl, no plots."""
    backend: str | None = None
    """Shorthand for one backend (``backend: mlflow`` = ``backends: [mlflow]``; ``none`` = []); folded into
    ``backends`` when the config is loaded."""
    uri: str | None = None
    """MLflow tracking URI (http://server:5000, sqlite:///path.db, databricks). None = an embedded store
    sqlite:///<run_dir>/mlflow/mlflow.db with artifacts in <run_dir>/mlflow/artifacts: no server, no network.
    MLFLOW_TRACKING_URI is deliberately ignored: nothing leaves the machine unless this key says so."""
    experiment: str = "megatron_align"
    """MLflow experiment name (created when missing); also the W&B project."""
    run_name: str | None = None
    """MLflow / W&B run name; default: the run_dir's directory name."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags on the MLflow run, W&B run config and TensorBoard text (e.g. condition: alignment_upsampled)."""
    plots: bool = True
    """Write <run_dir>/plots/*.png at the end of training (needs matplotlib) and log them as artifacts."""
    artifacts: bool = True
    """Log config.yaml, the sources' prepare manifests and filter reports, eval reports and plots as artifacts."""

    def __post_init__(self) -> None:
        if self.backend is not None:
            if self.backend not in (*BACKENDS, "none"):
                raise ConfigError(f"tracking.backend={self.backend!r}: expected one of {', '.join(BACKENDS)} or none")
            if self.backends and self.backends != [self.backend]:
                raise ConfigError(f"tracking.backend={self.backend!r} and tracking.backends={self.backends}: "
                                  "set only tracking.backends")
            self.backends = [] if self.backend == "none" else [self.backend]
            self.backend = None
        self.backends = list(self.backends)
        for name in self.backends:
            if name not in BACKENDS:
                raise ConfigError(f"tracking.backends: {name!r} is not one of {', '.join(BACKENDS)}")
        if len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"tracking.backends={self.backends}: a backend is listed twice")
        if not self.experiment:
            raise ConfigError("tracking.experiment: must be a non-empty name")
        if self.uri is not None and not self.uri.strip():
            raise ConfigError("tracking.uri: empty; leave it unset (null) for the embedded store under run_dir")
        if self.uri and "mlflow" not in self.backends:
            raise ConfigError(f"tracking.uri is set but tracking.backends={self.backends} has no mlflow; add mlflow")
