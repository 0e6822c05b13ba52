"""The package's small file I/O helpers, written once: atomic writes, JSON Lines, human-readable sizes.

Atomic means a reader sees the old file or the new one, never a torn one: the data goes to a temporary file in
the same directory (so ``os.replace`` is a rename on one filesystem) and is renamed over the target; on any
error, a full disk included, the temporary file is removed and the error re-raised, so nothing half-written is
left looking complete. JSON Lines files are appended with one ``write`` on an ``O_APPEND`` descriptor, so lines
from several processes never interleave; a reader skips torn or unparsable lines (a process killed mid-write
leaves at most its last line torn). Standard library only: the supervisor and the corpus tools import this.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _tmp_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", *, fsync: bool = False, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; rename it to ``path`` when the block ends without an
    error, remove it when it raises. ``mode`` is ``"w"`` or ``"wb"``; ``fsync`` makes the data durable first."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', not {mode!r}")
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes, *, fsync: bool = False) -> None:
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str, text: str, *, fsync: bool = False) -> None:
    with atomic_open(path, "w", fsync=fsync) as f:
        f.write(text)


def atomic_write_json(path: str, obj: Any, *, indent: int | None = None, default: Any = None,
                      fsync: bool = False) -> None:
    """``obj`` as JSON at ``path``, atomically (``default``: as for ``json.dumps``, e.g. ``str``)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=default), fsync=fsync)


class AtomicOutput:
    """A binary file written under a temporary name next to ``path`` (``stream``) and renamed by :meth:`commit`;
    :meth:`discard` removes it. For outputs filled across several functions, where :func:`atomic_open`'s ``with``
    block does not fit. ``compress``: gzip with mtime 0 and no file name, so the same data gives the same bytes."""

    def __init__(self, path: str | os.PathLike, compress: bool = False) -> None:
        self.path = Path(path)
        self.tmp = Path(_tmp_name(str(path)))
        self._raw = open(self.tmp, "wb")
        self.stream: IO[bytes] = (
            gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0) if compress else self._raw
        )

    def commit(self) -> None:
        self.stream.close()
        self._raw.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.stream.close()
        self._raw.close()
        self.tmp.unlink(missing_ok=True)
class JsonlAppender:
    """:func:`append_jsonl` for many records: one ``O_APPEND`` descriptor held open, one ``write`` per line."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict, *, default: Any = str) -> None:
        os.write(self.fd, (json.dumps(record, default=default) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_jsonl(path: str, record: dict, *, default: Any = str) -> None:
    """Append ``record`` as one line with a single ``write`` on an ``O_APPEND`` descriptor (whole lines, never
    interleaved with another process's); the directory is created if needed."""
    with JsonlAppender(path) as appender:
        appender.append(record, default=default)


def iter_jsonl(path: str, *, offset: int = 0) -> Iterator[dict]:
    """The JSON objects of a JSON Lines file from byte ``offset`` on. Lines that do not parse as a JSON object
    (torn by a crash mid-write, or damaged) are skipped; an absent or unreadable file yields nothing."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            for raw in f:
                try:
                    value = json.loads(raw.decode("utf-8", errors="replace"))
                except ValueError:
                    continue
                if isinstance(value, dict):
                    yield value
    except OSError:
        return


def read_jsonl(path: str, *, since: float | None = None, offset: int = 0) -> list[dict]:
    """:func:`iter_jsonl` as a list; with ``since``, only records whose ``time`` field is at least ``since``."""
    records = list(iter_jsonl(path, offset=offset))
    if since is None:
        return records
    kept = []
    for record in records:
        try:
            if float(record.get("time", 0)) >= since:
                kept.append(record)
        except (TypeError, ValueError):
            continue
    return kept


def file_size(path: str) -> int:
    """Size of ``path`` in bytes, 0 when it does not exist or cannot be read (an offset for :func:`iter_jsonl`)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def human_bytes(num_bytes: float | None, *, binary: bool = False) -> str:
    """``1.5 GB`` (powers of 1000) or, with ``binary``, ``1.4 GiB`` (powers of 1024); ``unknown`` for None."""
    if num_bytes is None:
        return "unknown"
    base, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB")) if binary else \
        (1000, ("B", "kB", "MB", "GB", "TB", "PB"))
    value = float(num_bytes)
    for unit in units:
        if abs(value) < base or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= base
    raise AssertionError("unreachable")


def human_count(number: float) -> str:
    """A count with a suffix: ``1.23K``, ``4.56M``, ``7.89B``, ``1.00T`` (tokens, samples, parameters)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.2f}{unit}"
    return f"{number:g}"
