"""Checkpoint checksums: written at commit, checked on resume and by `megatron-align checkpoint verify`.

Why: a checkpoint whose bytes were damaged after the write (a flipped bit on a disk or in a
network filesystem's cache, a bad copy) still unpickles, loads, and poisons training a few
steps later (NaN, then a restart loop; Megatron-LM #5281). Sizes and a parseable header
prove nothing; only a digest of the content does.

How: at commit every rank digests the files it wrote (xxh3-64: several GB/s per core, see
docs/benchmarks.md) and rank 0 writes them all into the checkpoint's marker
(``megatron_align.json`` -> ``checksums: {algorithm, files: {name: {size, digest}}}``). The
marker itself is the container and is not digested (it is rewritten atomically, last). Readers
(resume, ``convert to-hf``, ``eval``, this verb) recompute and compare; resume splits the files
over its ranks. Checkpoints written before checksums existed verify as "no checksums recorded".

Torch-free, so the CLI and the supervisor pay no import cost.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import xxhash

from megatron_align.errors import UserError
from megatron_align.training.checkpoint_files import complete_checkpoints, is_complete, read_marker

ALGORITHM = "xxh3_64"
_CHUNK = 8 << 20


def digest_file(path: str) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_files(directory: str, names: list[str]) -> dict[str, dict]:
    """name -> {size, digest} for files of ``directory``."""
    out = {}
    for name in names:
        path = os.path.join(directory, name)
        out[name] = {"size": os.path.getsize(path), "digest": digest_file(path)}
    return out


def recorded_checksums(path: str) -> dict[str, dict] | None:
    """The marker's name -> {size, digest} map, or None for a checkpoint saved without checksums."""
    sums = read_marker(path).get("checksums")
    if not sums:
        return None
    if sums.get("algorithm") != ALGORITHM:
        raise UserError(f"{path}: checksums use {sums.get('algorithm')!r}; this version verifies {ALGORITHM}")
    return sums["files"]


def verify_checkpoint(path: str, part: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems found in checkpoint dir ``path`` (empty = good). ``part=(i, n)`` checks every n-th file from i."""
    files = recorded_checksums(path)
    if files is None:
        return []
    problems = []
    index, count = part
    for name in sorted(files)[index::count]:
        expected, file = files[name], os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{file}: missing")
            continue
        size = os.path.getsize(file)
        if size != expected["size"]:
            problems.append(f"{file}: size {size} bytes, {expected['size']} recorded at save")
        elif digest_file(file) != expected["digest"]:
            problems.append(f"{file}: content changed since the save ({ALGORITHM} {digest_file(file)} != "
                            f"{expected['digest']} recorded; same size: damaged bytes)")
    return problems


def require_verified(path: str) -> None:
    """For readers outside training (convert, eval): UserError naming the first bad file."""
    problems = verify_checkpoint(path)
    if problems:
        raise UserError(f"checkpoint {path} failed checksum verification: {problems[0]}"
                        + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                        + "; use an older checkpoint (`megatron-align checkpoint verify` checks each)")


def verify_checkpoints(path: str) -> Iterator[tuple[str, dict | None, list[str], float]]:
    """``checkpoint verify``: ``(checkpoint, recorded files or None, problems, seconds)`` for ``path`` (one complete
    checkpoint) or for every complete checkpoint under it (a checkpoint root), each as soon as it is checked."""
    if is_complete(path):
        targets = [path]
    else:
        targets = [p for _s, p in complete_checkpoints(path)]
        if not targets:
            raise UserError(f"{path}: not a complete checkpoint and holds no complete iter_* checkpoint")
    for target in targets:
        started = time.time()
        files = recorded_checksums(target)
        problems = verify_checkpoint(target) if files is not None else []
        yield target, files, problems, time.time() - started
