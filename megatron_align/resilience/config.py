"""Config for megatron_align.resilience (composed into the root config as `resilience:`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ResilienceConfig:
    enabled: bool = False
    """Turn the resilience callbacks on."""
