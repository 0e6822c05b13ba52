"""Typed configuration: one dataclass per area (this package's modules) and the YAML/override loader.

Every name a caller needs is exported here: ``from megatron_align.config import RootConfig, ModelConfig``.
"""

from megatron_align.config.corpus import TokenizerConfig
from megatron_align.config.data import DataConfig, MixtureConfig, PhaseConfig, SourceConfig
from megatron_align.config.eval import EvalConfig
from megatron_align.config.loader import config_from_dict, config_to_dict, config_to_yaml, load_config
from megatron_align.config.model import FP8Config, ModelConfig
from megatron_align.config.resilience import ResilienceConfig
from megatron_align.config.root import RootConfig
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

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "FP8Config",
    "LoggingConfig",
    "MixtureConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PhaseConfig",
    "ProfileConfig",
    "ResilienceConfig",
    "RootConfig",
    "RunLockConfig",
    "SlurmConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
]
