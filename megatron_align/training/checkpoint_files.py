"""Checkpoint directory rules, without torch: which iter_* dirs are complete, and which one to resume.

Kept free of torch/Megatron imports so the supervisor (outside the ranks) and tools can use the exact
rule the trainer uses, at no import cost. The commit protocol itself is in
:mod:`megatron_align.training.checkpoint`.
"""

from __future__ import annotations

import json
import os
import re

from megatron_align.errors import UserError
from megatron_align.fileio import atomic_write_text

MARKER = "megatron_align.json"
LATEST = "latest"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointLoadError(UserError):
    """Checkpoint directory ``path`` could not be loaded (damaged shards, unreadable marker, a checksum).

    Raised by our own load path whatever the library underneath raised, so the cause is known from
    *where* it failed, not from a library's message: the rank records ``path`` and exits
    ``EXIT_CHECKPOINT_LOAD`` (see :mod:`megatron_align.resilience.protocol.exit_codes`). Re-exported by
    :mod:`megatron_align.training.checkpoint`, the public checkpoint API.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        """The checkpoint directory (an ``iter_*`` dir) whose load failed."""


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def durable_write(path: str, text: str) -> None:
    """``text`` at ``path`` atomically, fsynced, and the directory entry fsynced too (survives a power loss)."""
    atomic_write_text(path, text, fsync=True)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER)) and os.path.isfile(os.path.join(path, "metadata.json"))


def read_marker(path: str) -> dict:
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointLoadError(path, f"{marker}: unreadable checkpoint marker ({err}); the checkpoint is incomplete "
                                  "or corrupt") from None


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        match = _ITER_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(path: str) -> str | None:
    """A checkpoint root (with `latest`/iter_*) or one iter_* dir -> the newest complete iter dir, or None.

    ``latest`` is trusted only when it names a complete checkpoint; otherwise the
    newest complete iter_* wins (a crash between rename and `latest` update, or a
    damaged newest checkpoint, falls back to an older good one).
    """
    if is_complete(path):
        return path
    latest_file = os.path.join(path, LATEST)
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            named = os.path.join(path, f.read().strip())
        if is_complete(named):
            newest = complete_checkpoints(path)
            if not newest or newest[-1][1] == named:
                return named
    found = complete_checkpoints(path)
    return found[-1][1] if found else None


def retained(steps: list[int], keep_last: int, keep_every: int | None) -> set[int]:
    """Steps to keep: the newest ``keep_last``, multiples of ``keep_every``, and always the newest."""
    if not steps:
        return set()
    keep = set(sorted(steps)[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    keep.add(max(steps))
    return keep
