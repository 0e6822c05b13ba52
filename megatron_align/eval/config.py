"""Config for megatron_align.eval (composed into the root config as `eval:`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    enabled: bool = False
    """Turn the eval callbacks on."""
