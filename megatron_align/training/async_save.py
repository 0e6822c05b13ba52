"""Which background checkpoint writer to use: nvidia-resiliency-ext's or Megatron-Core's own.

Megatron-Core 0.19 deprecates its own async save ("mcore") in favour of nvidia-resiliency-ext's
("nvrx"); ``dist_checkpointing.save`` there takes ``async_strategy`` and *defaults to nvrx*, so a
caller that does not choose fails on a machine without nvidia-resiliency-ext. 0.16.1 has only its
own writer and no such argument. The rule here, one for the trainer and ``doctor``:

- ``nvrx`` when Megatron-Core offers the choice (its ``strategies/nvrx.py`` exists) *and* its own
  ``has_nvrx_async_support()`` accepts the installed nvidia-resiliency-ext;
- ``mcore`` otherwise, with the reason (e.g. nvidia-resiliency-ext 0.7 wheels need glibc 2.39, so
  on an older system the import fails and we fall back instead of crashing the first save).

``checkpoint.async_writer`` (``auto`` | ``mcore`` | ``nvrx``) forces one: ``mcore`` always works; ``nvrx`` where
the rule above would not pick it is a :class:`~megatron_align.errors.ConfigError` naming why (never a silent
fallback: whoever forces it wants to test that writer).

The async request and the queue that runs it must come from the same library, so the queue is
built here too. Deciding needs no Megatron import unless nvidia-resiliency-ext is installed (doctor
stays fast).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from functools import cache

from megatron_align.errors import ConfigError

WRITERS = ("auto", "mcore", "nvrx")
"""Values of ``checkpoint.async_writer``."""


@dataclass(frozen=True)
class AsyncStrategy:
    name: str
    """``nvrx`` (nvidia-resiliency-ext's writer) or ``mcore`` (Megatron-Core's own)."""
    reason: str
    """Why this one: one line for logs and ``doctor``."""
    selectable: bool
    """True when ``dist_checkpointing.save`` takes ``async_strategy`` (Megatron-Core >= 0.17)."""


def _mcore_offers_nvrx() -> bool:
    try:
        files = importlib.metadata.files("megatron-core") or []
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(str(f).replace("\\", "/").endswith("dist_checkpointing/strategies/nvrx.py") for f in files)


@cache
def choose(writer: str = "auto") -> AsyncStrategy:
    """The async checkpoint writer this process uses for ``checkpoint.async_writer=writer`` (decided once)."""
    if writer == "mcore":
        return AsyncStrategy("mcore", "forced by checkpoint.async_writer=mcore", _mcore_offers_nvrx())
    found = _auto()
    if writer == "nvrx" and found.name != "nvrx":
        raise ConfigError(f"checkpoint.async_writer=nvrx, but that writer cannot run here: {found.reason}; "
                          "use checkpoint.async_writer=auto or mcore")
    if writer == "nvrx":
        return AsyncStrategy("nvrx", f"forced by checkpoint.async_writer=nvrx ({found.reason})", True)
    return found


def _auto() -> AsyncStrategy:
    try:
        mcore = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        mcore = "?"
    if not _mcore_offers_nvrx():
        return AsyncStrategy("mcore", f"megatron-core {mcore} has only its own async save", False)
    if importlib.util.find_spec("nvidia_resiliency_ext") is None:
        return AsyncStrategy("mcore", "nvidia-resiliency-ext not installed (pip install nvidia-resiliency-ext "
                             "for the writer Megatron-Core recommends)", True)
    try:
        # Import it ourselves first: Megatron's check swallows the ImportError that says *why* (e.g. a wheel
        # built for glibc 2.39 on an older system), then ask Megatron, which knows the symbols it needs.
        importlib.import_module("nvidia_resiliency_ext.checkpointing.async_ckpt.core")
        from megatron.core.dist_checkpointing.strategies.nvrx import has_nvrx_async_support

        usable = has_nvrx_async_support()
        problem = "its async checkpoint API lacks what this megatron-core needs"
    except (ImportError, OSError, AssertionError) as err:  # a newer-glibc wheel, a version below Megatron's minimum
        usable, problem = False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if not usable:
        return AsyncStrategy("mcore", f"nvidia-resiliency-ext {_version('nvidia-resiliency-ext')} unusable "
                             f"here ({problem})", True)
    return AsyncStrategy("nvrx", f"nvidia-resiliency-ext {_version('nvidia-resiliency-ext')}", True)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def save_kwargs(strategy: AsyncStrategy) -> dict:
    """Extra keyword arguments for ``dist_checkpointing.save`` (none on versions without the choice)."""
    return {"async_strategy": strategy.name} if strategy.selectable else {}


def calls_queue(strategy: AsyncStrategy):
    """The queue that runs and finalizes this strategy's async requests."""
    if strategy.name == "nvrx":
        from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue
    else:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
    return AsyncCallsQueue()


def start_results_queue(strategy: AsyncStrategy) -> None:
    """Create the writer-results Manager process(es) now (see checkpoint._start_writer_manager_with_signals_blocked).

    Megatron-Core's own queue always (synchronous saves use its writer on every version), plus
    nvidia-resiliency-ext's when that writer is in use.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # 0.16.1 names it _get_write_results_queue; 0.19 made it public
    getters = [getattr(filesystem_async, "get_write_results_queue", None) or
               getattr(filesystem_async, "_get_write_results_queue", None)]
    if strategy.name == "nvrx":
        from nvidia_resiliency_ext.checkpointing.async_ckpt.filesystem_async import get_write_results_queue

        getters.append(get_write_results_queue)
    for getter in getters:
        if getter is not None:
            getter()
