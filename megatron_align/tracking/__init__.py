"""megatron_align.tracking: see the module docstrings."""

from __future__ import annotations


def build_callbacks(config) -> list:
    """Trainer callbacks for this area, from the root config (empty when disabled)."""
    return []
