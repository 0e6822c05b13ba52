"""Config for megatron_align.tracking (composed into the root config as ``tracking:``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_align.errors import ConfigError

BACKENDS = ("mlflow", "jsonl", "none")


@dataclass
class TrackingConfig:
    backend: str = "none"
    """mlflow (an MLflow run; embedded local store by default) | jsonl (params.json + plots next to
    metrics.jsonl, no dependency) | none (nothing beyond metrics.jsonl, no plots)."""
    uri: Optional[str] = None
    """MLflow tracking URI (http://server:5000, sqlite:///path.db, databricks). None = an embedded store
    sqlite:///<run_dir>/mlflow/mlflow.db with artifacts in <run_dir>/mlflow/artifacts: no server, no network.
    MLFLOW_TRACKING_URI is deliberately ignored: nothing leaves the machine unless this key says so."""
    experiment: str = "megatron_align"
    """MLflow experiment name (created when missing)."""
    run_name: Optional[str] = None
    """MLflow run name; default: the run_dir's directory name."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags on the MLflow run (e.g. condition: alignment_upsampled)."""
    plots: bool = True
    """Write <run_dir>/plots/*.png at the end of training (needs matplotlib) and log them as artifacts."""
    artifacts: bool = True
    """Log config.yaml, the sources' prepare manifests and filter reports, eval reports and plots as artifacts."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"tracking.backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if not self.experiment:
            raise ConfigError("tracking.experiment: must be a non-empty name")
        if self.uri is not None and not self.uri.strip():
            raise ConfigError("tracking.uri: empty; leave it unset (null) for the embedded store under run_dir")
        if self.uri and self.backend != "mlflow":
            raise ConfigError(f"tracking.uri is set but tracking.backend={self.backend!r}; set tracking.backend=mlflow")
