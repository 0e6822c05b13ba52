"""Storage faults as a failure class: full disks, quotas, read-only remounts, I/O errors.

What: on clusters a full Lustre OST, an exhausted quota or a filesystem remounted read-only
loses more days than GPUs do, and a restart cannot fix any of them: the next attempt meets the
same full disk. So a storage fault is its own verdict. The rank that hits one raises
:class:`StorageError` (path, errno, free bytes, bytes it needed), appends that record to
``<run_dir>/storage_failures.jsonl`` (best effort: the disk may be full, then stderr only) and
exits ``EXIT_STORAGE`` (89); the supervisor stops instead of retrying and prints one message
naming the run directory, the space, the intact checkpoint and what to do.

The one idea: decide from the ``errno`` (ENOSPC, EDQUOT, EROFS, EIO), never from message
text. Libraries wrap the ``OSError`` (Megatron-Core's checkpoint writer raises
``RuntimeError("Worker failure: ...") from err`` and torch's ``CheckpointException`` keeps
per-rank failures in ``.failures``), so :func:`storage_errno` walks the cause/context chain and
those containers. Some writers lose the errno altogether: torch.save's zip writer, which
dist_checkpointing uses for every shard, reports a short write on a full disk only as
``unexpected pos 704 vs 598``; and a rank may only see a peer's failure. Those are classified by
the free space left on the filesystem they were writing to (:func:`looks_full`), still not by text.

Torch-free: the supervisor and the CLI import it.
"""

from __future__ import annotations

import errno as errno_module
import json
import os
import shutil
import sys
import time

from megatron_align.errors import UserError
from megatron_align.fileio import human_bytes
from megatron_align.resilience.protocol.run_files import STORAGE_FAILURES_FILE, append_record, read_records

STORAGE_ERRNOS = {errno_module.ENOSPC: "no space left", errno_module.EDQUOT: "disk quota exceeded",
                  errno_module.EROFS: "read-only filesystem", errno_module.EIO: "I/O error"}
FULL_MARGIN_BYTES = 1 << 20
"""Free space below this counts as a full filesystem (a peer's failed write, no errno of our own)."""

_simulated_full: set[str] = set()  # realpaths the `disk_full@S` drill declared full (resilience/inrank/inject.py)


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def simulate_full(path: str) -> None:
    """Fault injection (``disk_full@S``): from now on this process sees the filesystem of ``path`` as full."""
    _simulated_full.add(os.path.realpath(_existing(path)))


def free_bytes(path: str) -> int | None:
    """Bytes available to this user on the filesystem holding ``path`` (or its nearest existing parent)."""
    where = _existing(path)
    real = os.path.realpath(where)
    if any(real == p or real.startswith(p + os.sep) or p.startswith(real + os.sep) for p in _simulated_full):
        return 0
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def dir_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def storage_errno(err: BaseException | None, _seen: set | None = None) -> int | None:
    """The storage errno (ENOSPC/EDQUOT/EROFS/EIO) behind ``err``, following causes and wrapped failures."""
    seen = _seen if _seen is not None else set()
    if err is None or id(err) in seen:
        return None
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return err.errno
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint.CheckpointException: rank -> (exc, tb)
    if isinstance(failures, dict):
        for item in failures.values():
            found = storage_errno(item[0] if isinstance(item, tuple) else item, seen)
            if found:
                return found
    for inner in (getattr(err, "__cause__", None), getattr(err, "__context__", None)):
        found = storage_errno(inner, seen)
        if found:
            return found
    return None


def looks_full(path: str) -> bool:
    free = free_bytes(path)
    return free is not None and free < FULL_MARGIN_BYTES


class StorageError(UserError):
    """A write failed (or would fail) for lack of space / quota / a writable, healthy filesystem."""

    def __init__(self, path: str, errno: int, needed_bytes: int | None = None, detail: str = "",
                 free: int | None = None) -> None:
        self.path = path
        self.errno = errno
        self.free_bytes = free_bytes(path) if free is None else free
        self.needed_bytes = needed_bytes
        what = STORAGE_ERRNOS.get(errno, os.strerror(errno))
        need = f", needs ~{human_bytes(needed_bytes)}" if needed_bytes else ""
        super().__init__(f"{path}: {what} [{errno_module.errorcode.get(errno, errno)}] "
                         f"(free {human_bytes(self.free_bytes)}{need})" + (f"; {detail}" if detail else ""))

    def record(self, rank: int) -> dict:
        return {"rank": rank, "path": self.path, "errno": self.errno,
                "errno_name": errno_module.errorcode.get(self.errno, str(self.errno)),
                "free_bytes": self.free_bytes, "needed_bytes": self.needed_bytes, "message": str(self)}


def from_os_error(
    err: BaseException, path: str, needed_bytes: int | None = None, detail: str = ""
) -> StorageError | None:
    """A StorageError for ``err`` when it is a storage fault (by errno, or a full filesystem at ``path``)."""
    code = storage_errno(err)
    if code is None and looks_full(path):
        code = errno_module.ENOSPC
    if code is None:
        return None
    where = getattr(err, "filename", None) if isinstance(err, OSError) and err.filename else path
    return StorageError(str(where), code, needed_bytes, detail)


def report_storage_failure(run_dir: str, rank: int, error: StorageError) -> None:
    """Append the rank's record to ``<run_dir>/storage_failures.jsonl``; on a full disk, stderr is all there is."""
    record = dict(error.record(rank), time=time.time())
    try:
        append_record(run_dir, STORAGE_FAILURES_FILE, record)
    except OSError as err:
        print(f"megatron-align: could not record the storage failure in {run_dir} ({err}): "
              f"{json.dumps(record)}", file=sys.stderr, flush=True)


def read_storage_failures(run_dir: str, since: float = 0.0) -> list[dict]:
    return read_records(run_dir, STORAGE_FAILURES_FILE, since)


def storage_verdict(run_dir: str, since: float, checkpoint: str | None) -> str:
    """The supervisor's one message after a storage failure: where, how much space, which checkpoint is intact,
    what to do (never a restart). ``since``: the attempt's start; ``checkpoint``: the newest complete one."""
    records = read_storage_failures(run_dir, since=since)
    record = next((r for r in records if r.get("needed_bytes")), records[0] if records else None)
    if record is None:  # the disk was too full even for the record
        record = {"path": run_dir, "errno": errno_module.ENOSPC, "free_bytes": free_bytes(run_dir)}
    code = int(record.get("errno") or errno_module.ENOSPC)
    needed = f", checkpoint needs ~{human_bytes(record['needed_bytes'])}" if record.get("needed_bytes") else ""
    intact = (f"latest good checkpoint {os.path.basename(checkpoint)} is intact" if checkpoint
              else "no checkpoint was written yet")
    todo = {errno_module.EROFS: "the filesystem is read-only (remounted after errors?): have it fixed",
            errno_module.EIO: "the filesystem reports I/O errors: have it checked (dmesg)"}.get(
        code, "free space or lower checkpoint.keep_last" if checkpoint else "free space")
    where = "" if os.path.abspath(str(record.get("path"))) == os.path.abspath(run_dir) else f" at {record.get('path')}"
    return (
        f"run_dir {run_dir}: {STORAGE_ERRNOS.get(code, os.strerror(code))}{where} "
        f"(free {human_bytes(record.get('free_bytes'))}{needed}); {intact}; {todo}, then run the same command "
        f"(not restarted: a restart meets the same filesystem)"
    )
