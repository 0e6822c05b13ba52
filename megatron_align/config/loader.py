"""Load a RootConfig from YAML plus ``key=value`` overrides.

omegaconf is used only here, at the edge: it merges the file and overrides onto
the structured schema (which rejects unknown keys and wrong types, naming the
key), then converts to plain dataclasses whose ``__post_init__`` checks values.
Everything past this module sees dataclasses, never DictConfig.
"""

from __future__ import annotations

import dataclasses
import os
from typing import cast

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from megatron_align.config.root import RootConfig
from megatron_align.errors import ConfigError


def _parse_overrides(overrides: list[str]) -> list[str]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.steps=100)")
    return list(overrides)


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return raw


def explicit_keys(path: str | None, overrides: list[str] | None = None) -> set[str]:
    """Dotted keys the file or the overrides set, as opposed to schema defaults (``plan`` requires some)."""
    keys = set(flatten(_read_yaml(path))) if path is not None else set()
    return keys | {item.split("=", 1)[0] for item in _parse_overrides(overrides or [])}


def load_config(path: str | None, overrides: list[str] | None = None) -> RootConfig:
    """YAML file (optional) + dotted overrides -> validated RootConfig."""
    schema = OmegaConf.structured(RootConfig)
    layers = []
    where = path or "<defaults>"
    if path is not None:
        layers.append(OmegaConf.create(_read_yaml(path)))
    layers.append(OmegaConf.from_dotlist(_parse_overrides(overrides or [])))
    try:
        merged = OmegaConf.merge(schema, *layers)
        config = cast(RootConfig, OmegaConf.to_object(merged))
    except ConfigKeyError as err:
        raise ConfigError(
            f"{where}: unknown key {err.full_key!r} (see README 'Config reference' for valid keys)"
        ) from None
    except ValidationError as err:
        raise ConfigError(f"{where}: key {err.full_key!r}: {str(err.msg).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        # __post_init__ ConfigErrors surface wrapped by omegaconf; unwrap them.
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{where}: {cause}") from None
        raise ConfigError(f"{where}: {getattr(err, 'full_key', '')}: {getattr(err, 'msg', err)}") from None
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except (TypeError, ValueError, KeyError, IndexError) as err:  # e.g. an override indexing into a list
        raise ConfigError(
            f"{where}: cannot apply {overrides or 'the file'}: {err}; override whole lists "
            "(key=[...]) or edit the YAML file"
        ) from None
    return config


def config_to_dict(config: RootConfig) -> dict:
    return dataclasses.asdict(config)


def config_to_yaml(config: RootConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def config_from_dict(data: dict) -> RootConfig:
    """Rebuild a config saved in a checkpoint or run dir (validated like a file)."""
    try:
        return cast(RootConfig, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RootConfig),
                                                                    OmegaConf.create(data))))
    except OmegaConfBaseException as err:
        raise ConfigError(f"saved config: {err}") from None


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1} (for trackers and diffs)."""
    out: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
