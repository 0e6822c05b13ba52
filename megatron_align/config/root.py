"""The root config: one typed dataclass per area, composed here.

Every area's dataclass lives in this package (:mod:`.model`, :mod:`.training`, :mod:`.data`, :mod:`.eval`,
:mod:`.tracking`, :mod:`.slurm`, ...) and imports nothing heavy, so loading and checking a config needs neither
torch nor numpy; the modules that do the work import their config from here, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_align.config.checks import choice
from megatron_align.config.data import DataConfig
from megatron_align.config.eval import EvalConfig
from megatron_align.config.model import FP8Config, ModelConfig
from megatron_align.config.resilience import ResilienceConfig
from megatron_align.config.schedule import resolve_schedule
from megatron_align.config.slurm import SlurmConfig
from megatron_align.config.tracking import TrackingConfig
from megatron_align.config.training import (
    CheckpointConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    ProfileConfig,
    RunLockConfig,
    TrainConfig,
)
from megatron_align.errors import ConfigError


@dataclass
class RootConfig:
    run_dir: str = "runs/default"
    """Everything the run writes goes here: config.yaml, metrics.jsonl, train.log, checkpoints/."""
    precision: str = "auto"
    """auto (bf16 with CUDA, fp32 on CPU) | fp32 | bf16 | fp8 (bf16 weights, FP8 GEMMs through Transformer Engine;
    see fp8.*)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Job-script settings for `megatron-align slurm render` (nodes, partition, account, time, container)."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 recipe settings, used when precision=fp8 (docs/fp8.md)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Torch profiler traces / nsys range / CUDA memory snapshots over a step range (training/profiling.py)."""
    run_lock: RunLockConfig = field(default_factory=RunLockConfig)
    """One run per run_dir: the lease's heartbeat and when a silent holder counts as gone (training/run_lock.py)."""

    def __post_init__(self) -> None:
        choice("precision", self.precision, ("auto", "fp32", "bf16", "fp8"))
        if not self.run_dir:
            raise ConfigError("run_dir: must be a non-empty path")
        if self.data.reset_attention_mask and self.parallel.context > 1 and self.parallel.pipeline > 1:
            # THD under context parallelism pads every document to 2 x cp: the packed length varies per micro-batch,
            # and the pipeline sends fixed shapes between stages.
            raise ConfigError(
                f"data.reset_attention_mask=true with parallel.context={self.parallel.context} and "
                f"parallel.pipeline={self.parallel.pipeline}: document masking under context parallelism pads each "
                "document (a varying packed length) and runs with parallel.pipeline=1 only")
        if self.train.stop_at_step and self.train.stop_at_step > self.train.steps:
            raise ConfigError(f"train.stop_at_step={self.train.stop_at_step} is beyond train.steps={self.train.steps}")
        resolve_schedule(self.optimizer, self.train.steps)  # Megatron-Core's scheduler asserts; we name the keys
