"""The one input layer of the corpus verbs: corpus files -> numbered documents, with one set of skip reasons.

``filter``, ``tag``, ``prepare``, ``tokenizer train``, the datatrove pipelines
(:mod:`megatron_align.corpus.pipeline`) and the demo all read through here, so a
corpus is read the same way by every verb:

- **Formats** (``SUFFIXES``): JSONL (``.jsonl``/``.json``, plain, ``.gz`` or
  ``.zst``; one JSON object per line) and Parquet (``.parquet``; one row per
  document, the text in a column, as FineWeb and DCLM ship). A directory stands
  for its files with these suffixes, sorted by name.
- **Numbering**: every unit has a 1-based number -- the line of a JSONL file,
  the row of a Parquet file -- and reports name it as ``file:N``.
- **Skip reasons** (``SKIP_REASONS``): a unit that is not a usable document is
  skipped (or, with ``--strict``, stops the run) with one of these reasons and a
  detail; blank JSONL lines are neither documents nor errors.
- **Corrupt streams**: a truncated or corrupt compressed file or Parquet file
  raises :class:`UserError` naming the file and the last unit read; the verbs
  write outputs under temporary names, so nothing half-written is published.

A Parquet row is handed on as the JSON line it would be in JSONL
(``json.dumps(row, ensure_ascii=False)``), so the same parser judges both
formats and a corpus converted between them gives the same documents.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator

from megatron_align.errors import UserError
from megatron_align.fileio import human_bytes
from megatron_align.optional import optional_import, require

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".jsonl.zstd", ".json.zstd")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
SKIP_REASONS = ("non_utf8", "malformed_json", "missing_field", "non_string_field", "empty_document")
"""Why a unit is not a document (the keys of every skipped count, in this order)."""
MAX_LISTED_BAD_LINES = 1000
"""Skipped units a report lists one by one (the rest are only counted)."""
_PARQUET_BATCH_ROWS = 1024


class BadLine(Exception):
    """One input unit that is not a usable document; ``reason`` is a short report key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def expand_inputs(inputs: list[str] | str) -> list[str]:
    """Files as given; a directory stands for its corpus files (``SUFFIXES``), sorted by name."""
    paths: list[str] = []
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item)
                           if n.endswith(SUFFIXES) and os.path.isfile(os.path.join(item, n)))
            if not found:
                raise UserError(f"{item}: directory holds no corpus files (looked for {', '.join(SUFFIXES)})")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"{item}: input file does not exist")
    if not paths:
        raise UserError("no input files given")
    return paths


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)
    zstd = optional_import("zstandard")
    if zstd is not None:
        errors += (zstd.ZstdError,)
    pyarrow = optional_import("pyarrow")
    if pyarrow is not None:
        errors += (pyarrow.ArrowException,)
    return errors


def _jsonl_lines(path: str, raw) -> Iterator[bytes]:
    if path.endswith(".gz"):
        yield from gzip.GzipFile(fileobj=raw, mode="rb")
    elif path.endswith((".zst", ".zstd")):
        zstd = require("zstandard", f"reading {path}")
        # read_across_frames: files written by parallel compressors have many frames
        yield from io.BufferedReader(zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    else:
        yield from raw


def _parquet_rows(path: str, raw, text_field: str) -> Iterator[bytes]:
    pq = require("pyarrow.parquet", f"reading {path}")
    parquet = pq.ParquetFile(raw)
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            yield json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass") + b"\n"


def iter_units(path: str, text_field: str = "text", position: list[int] | None = None) -> Iterator[tuple[int, bytes]]:
    """(1-based line or row number, raw JSON line with its newline) of one corpus file.

    ``position``, when given, holds the compressed bytes consumed so far in ``position[0]`` (progress).
    A corrupt or truncated stream raises :class:`UserError` naming the file and the last good unit.
    """
    number = 0
    with open(path, "rb") as raw:
        units = _parquet_rows(path, raw, text_field) if path.endswith(PARQUET_SUFFIXES) else _jsonl_lines(path, raw)
        try:
            for number, unit in enumerate(units, start=1):
                if position is not None and not number % 64:
                    position[0] = raw.tell()
                yield number, unit
        except _corrupt_errors() as err:
            unit_name = "row" if path.endswith(PARQUET_SUFFIXES) else "line"
            raise UserError(f"{path}: cannot read after {unit_name} {number} ({err}); is the file complete? "
                            "Nothing was published; re-download or drop the file and run again") from err
        if position is not None:
            position[0] = os.path.getsize(path)


def parse_unit(line: bytes, text_field: str) -> tuple[dict | None, str | None]:
    """(record, text) of a usable unit; (None, None) for a blank line; :class:`BadLine` otherwise."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadLine("non_utf8", f"invalid UTF-8 byte 0x{line[err.start]:02x} at byte {err.start}") from None
    if not s.strip():
        return None, None
    try:
        record = json.loads(s)
    except ValueError as err:
        raise BadLine("malformed_json", f"malformed JSON ({str(err)[:200]})") from None
    if not isinstance(record, dict):
        raise BadLine("malformed_json", f"expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(list(record)[:5])
        raise BadLine("missing_field", f"no {text_field!r} key (keys: {keys or 'none'}); set the text field")
    text = record[text_field]
    if not isinstance(text, str):
        raise BadLine("non_string_field", f"{text_field!r} is {type(text).__name__}, not a string")
    if not text.strip():
        raise BadLine("empty_document", f"{text_field!r} is empty or whitespace")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800") decodes to text no UTF-8 can hold
        raise BadLine("non_utf8", "lone surrogate escape in text") from None
    return record, text


def describe(path: str, number: int, reason: str, detail: str) -> str:
    """The one way a skipped unit is named in messages: ``file:N: reason: detail``."""
    return f"{path}:{number}: {reason}: {detail}"


def strict_error(path: str, number: int, bad: BadLine) -> UserError:
    return UserError(f"{describe(path, number, bad.reason, str(bad))} (--strict stops at the first unusable line; "
                     "without it such lines are skipped and reported)")


def iter_corpus(paths: list[str], text_field: str = "text",
                done_bytes: list[int] | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(file index, line or row number, raw unit) of every file in order.

    ``done_bytes``, when given, holds the input bytes (as stored: compressed) consumed so far over all files in
    ``done_bytes[0]``: what a :class:`Progress` shows.
    """
    finished = 0
    for file_index, path in enumerate(paths):
        position = [0]
        for number, unit in iter_units(path, text_field, position):
            if done_bytes is not None:
                done_bytes[0] = finished + position[0]
            yield file_index, number, unit
        finished += os.path.getsize(path)
        if done_bytes is not None:
            done_bytes[0] = finished


def iter_chunks(
    paths: list[str],
    text_field: str = "text",
    done_bytes: list[int] | None = None,
    max_bytes: int = 1 << 20,
    max_units: int | None = None,
) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """(file index, [(line or row number, raw unit), ...]) of :func:`iter_corpus` in chunks of one file each, of at
    most about ``max_bytes`` (and ``max_units`` units): what the data verbs hand to their worker processes."""
    chunk: list[tuple[int, bytes]] = []
    size, current = 0, 0
    for file_index, number, unit in iter_corpus(paths, text_field, done_bytes):
        if file_index != current and chunk:
            yield current, chunk
            chunk, size = [], 0
        current = file_index
        chunk.append((number, unit))
        size += len(unit)
        if size >= max_bytes or (max_units is not None and len(chunk) >= max_units):
            yield current, chunk
            chunk, size = [], 0
    if chunk:
        yield current, chunk


def iter_line_chunks(files: list, done_bytes: list[int] | None = None,
                     max_bytes: int = 1 << 20) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """:func:`iter_chunks` with each raw unit's line ending stripped: what ``filter`` and ``tag`` hand on."""
    for file_index, chunk in iter_chunks([str(f) for f in files], done_bytes=done_bytes, max_bytes=max_bytes):
        yield file_index, [(number, raw.rstrip(b"\r\n")) for number, raw in chunk]


def parse_document(raw: bytes, text_field: str) -> tuple[dict, str]:
    """(record, text) of one non-blank unit, or :class:`BadLine` saying what is wrong with it."""
    record, text = parse_unit(raw, text_field)
    assert record is not None and text is not None, "blank lines are handled by the caller"
    return record, text


def iter_documents(paths: list[str], text_field: str, skipped: dict[str, int] | None = None) -> Iterator[str]:
    """Usable texts of ``paths`` in order; skipped units are only counted (tokenizer training uses this)."""
    for _, _, unit in iter_corpus(paths, text_field):
        try:
            _, text = parse_unit(unit, text_field)
        except BadLine as bad:
            if skipped is not None:
                skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
            continue
        if text is not None:
            yield text


class Progress:
    """The one progress display of the corpus verbs: input bytes consumed, documents, tokens (prepare), rates.

    On a terminal: a tqdm bar when tqdm is installed, else one line rewritten in place every 0.5 s. Otherwise (a log
    file, a SLURM job's output, a pipe): a plain line every ``interval_s`` and a last one when done, e.g.
    ``filter: 100.0% of 35.5 MB, 120,000 docs, 41.20 MB/s`` (prepare adds ``, 13,100,000 tokens, 1,653,000
    tokens/s``).
    """

    def __init__(self, total_bytes: int, label: str, enabled: bool, tokens: bool = False,
                 interval_s: float = 10.0) -> None:
        self.enabled, self.label, self.total, self.tokens = enabled, label, max(total_bytes, 1), tokens
        self._start = self._last = time.monotonic()
        self._tty = enabled and sys.stderr.isatty()
        self._interval_s = 0.5 if self._tty else interval_s
        tqdm = optional_import("tqdm") if self._tty else None
        self._bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label) if tqdm is not None else None
        self._shown = 0

    def line(self, done_bytes: int, documents: int, tokens: int = 0) -> str:
        seconds = max(time.monotonic() - self._start, 1e-9)
        text = (f"{self.label}: {100 * done_bytes / self.total:5.1f}% of {human_bytes(self.total)}, "
                f"{documents:,} docs, {done_bytes / 1e6 / seconds:,.2f} MB/s")
        if self.tokens:
            text += f", {tokens:,} tokens, {tokens / seconds:,.0f} tokens/s"
        return text

    def update(self, done_bytes: int, documents: int, tokens: int = 0) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(done_bytes - self._shown)
            self._shown = done_bytes
            self._bar.set_postfix(docs=documents, **({"tokens": tokens} if self.tokens else {}), refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self._interval_s:
            self._last = now
            print(("\r" if self._tty else "") + self.line(done_bytes, documents, tokens),
                  end="" if self._tty else "\n", file=sys.stderr, flush=True)

    def close(self, documents: int, tokens: int = 0, failed: bool = False) -> None:
        if not self.enabled:
            return
        self.enabled = False
        if self._bar is not None:
            self._bar.close()
        elif not failed:
            print(("\r" if self._tty else "") + self.line(self.total, documents, tokens), file=sys.stderr, flush=True)
        elif self._tty:
            print(file=sys.stderr)
