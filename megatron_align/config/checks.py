"""The value checks every area's config uses in ``__post_init__``, written once.

Each raises a :class:`ConfigError` whose message starts with the dotted key (``model.spec='x': ...``), so the
user sees which line of their YAML or which override to change. Standard library only.
"""

from __future__ import annotations

from megatron_align.errors import ConfigError

TRISTATE = ("auto", "true", "false")


def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")


def tristate(key: str, value: str | bool) -> str:
    """``auto | true | false`` normalised to lower case (YAML/CLI booleans arrive as 'True'/'False' strings after
    omegaconf's str coercion)."""
    normalized = str(value).strip().lower()
    choice(key, normalized, TRISTATE)
    return normalized


def resolve_tristate(value: str, auto: bool) -> bool:
    """A normalised tristate as a bool, ``auto`` taking the value ``auto``."""
    return {"auto": auto, "true": True, "false": False}[value]


def positive(key: str, value: float | None, allow_zero: bool = False) -> None:
    """``value > 0`` (``>= 0`` with ``allow_zero``); None passes (an optional field left unset)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value}: must be {'>= 0' if allow_zero else '> 0'}")


def at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value}: must be >= {minimum}")


def fraction(key: str, value: float) -> None:
    """``0 < value <= 1``."""
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{key}={value}: must be in (0, 1]")
