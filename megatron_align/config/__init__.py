"""Typed configuration: schema dataclasses and the YAML/override loader."""

from megatron_align.config.loader import config_from_dict, config_to_dict, config_to_yaml, load_config
from megatron_align.config.schema import RootConfig

__all__ = ["RootConfig", "load_config", "config_to_dict", "config_to_yaml", "config_from_dict"]
