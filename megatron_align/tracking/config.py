"""Config for megatron_align.tracking (composed into the root config as `tracking:`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrackingConfig:
    enabled: bool = False
    """Turn the tracking callbacks on."""
