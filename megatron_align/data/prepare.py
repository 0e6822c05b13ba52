"""`megatron-align prepare`: JSONL documents -> one Megatron IndexedDataset per source.

What: every input line is a JSON object whose text field becomes one document
(tokens + EOD) in ``PREFIX.bin/.idx``, the format Megatron-Core's
``IndexedDataset`` / ``GPTDataset`` read. ``PREFIX.manifest.json`` records what
was built (counts, dtype, tokenizer identity, input checksums) and
``PREFIX.skipped.jsonl`` lists every line that was not used, with file:line.

Why a manifest: the sampler fingerprints sources by it, so a run never mixes
data tokenized differently or built from other inputs without saying so.

The one idea: workers tokenize *chunks* of raw lines while the parent reads
ahead and writes results strictly in submission order (a bounded window of
pending chunks). Output bytes therefore do not depend on the worker count,
and memory does not grow with the input. Outputs appear only when complete:
the report, ``.bin`` and ``.idx`` are renamed from temporary names first, the
manifest last, so a manifest is the commit marker of a finished source.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

import megatron_align
from megatron_align.data.tokenizer import DEFAULT_CONTROL_TOKENS, TokenizerConfig, build_tokenizer, encode_documents
from megatron_align.errors import UserError
from megatron_align.optional import optional_import, require

MANIFEST_VERSION = 1
SKIP_REASONS = ("non_utf8", "malformed_json", "missing_field", "non_string_field", "empty_document")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".json", ".json.gz", ".json.zst")
_CHUNK_LINES = 1024
_CHUNK_BYTES = 1 << 20
_NUM_REPORT_EXAMPLES = 10


# ---------------------------------------------------------------- reading JSONL


def expand_inputs(inputs: list[str] | str) -> list[str]:
    """Files as given; a directory stands for its JSONL files (``JSONL_SUFFIXES``), sorted by name."""
    paths: list[str] = []
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item) if n.endswith(JSONL_SUFFIXES))
            if not found:
                raise UserError(f"{item}: directory holds no JSONL files (looked for {', '.join(JSONL_SUFFIXES)})")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"{item}: input file does not exist")
    if not paths:
        raise UserError("no input files given")
    return paths


@contextlib.contextmanager
def open_jsonl(path: str) -> Iterator[tuple[io.BufferedIOBase, io.BufferedIOBase]]:
    """Yield (decompressed line reader, raw file); the raw file's ``tell()`` measures progress."""
    with open(path, "rb") as raw:
        if path.endswith(".gz"):
            reader: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb")
        elif path.endswith((".zst", ".zstd")):
            zstd = require("zstandard", f"reading {path}")
            reader = io.BufferedReader(zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        else:
            reader = raw
        zstd = optional_import("zstandard")
        corrupt = (OSError, EOFError) + ((zstd.ZstdError,) if zstd is not None else ())
        try:
            yield reader, raw
        except corrupt as err:  # truncated or corrupt compressed stream
            raise UserError(f"{path}: cannot read ({err}); is the file complete?") from err


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def parse_line(line: bytes, text_field: str) -> tuple[str | None, str | None, str]:
    """(text, None, "") for a usable line; (None, reason, detail) otherwise; (None, None, "") for a blank line.

    Blank lines are not documents and not errors (JSONL writers often leave one at the end).
    """
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "non_utf8", f"invalid UTF-8 byte 0x{line[err.start]:02x} at byte {err.start}"
    if not s.strip():
        return None, None, ""
    try:
        obj = json.loads(s)
    except ValueError as err:
        return None, "malformed_json", str(err)[:200]
    if not isinstance(obj, dict):
        return None, "malformed_json", f"expected a JSON object, got {type(obj).__name__}"
    if text_field not in obj:
        keys = ", ".join(list(obj)[:5])
        return None, "missing_field", f"no {text_field!r} key (keys: {keys or 'none'}); set the text field"
    text = obj[text_field]
    if not isinstance(text, str):
        return None, "non_string_field", f"{text_field!r} is {type(text).__name__}, not a string"
    if not text.strip():
        return None, "empty_document", f"{text_field!r} is empty or whitespace"
    return text, None, ""


def iter_documents(paths: list[str], text_field: str, skipped: dict[str, int] | None = None) -> Iterator[str]:
    """Usable texts of ``paths`` in order; skipped lines are only counted (tokenizer training uses this)."""
    for path in paths:
        with open_jsonl(path) as (reader, _):
            for line in reader:
                text, reason, _ = parse_line(line, text_field)
                if text is not None:
                    yield text
                elif reason is not None and skipped is not None:
                    skipped[reason] = skipped.get(reason, 0) + 1


# ---------------------------------------------------------------- tokenizing chunks

def _is_utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# A chunk result: (file index, flat token ids with EOD after each document, per-document lengths,
# [(line number, reason, detail)], blank lines).
ChunkResult = tuple[int, np.ndarray, list[int], list[tuple[int, str, str]], int]


def tokenize_chunk(tokenizer, text_field: str, file_index: int, first_line: int, lines: list[bytes]) -> ChunkResult:
    texts: list[tuple[int, str]] = []
    problems: list[tuple[int, str, str]] = []
    num_blank = 0
    for offset, line in enumerate(lines):
        text, reason, detail = parse_line(line, text_field)
        if text is None:
            if reason is None:
                num_blank += 1
            else:
                problems.append((first_line + offset, reason, detail))
            continue
        texts.append((first_line + offset, text))
    try:  # one batch per chunk (HF tokenizers encode it on their thread pool)
        documents = encode_documents(tokenizer, [t for _, t in texts])
    except Exception:  # noqa: BLE001 - find the line, below
        documents = []
        for line_number, text in texts:
            try:
                documents += encode_documents(tokenizer, [text])
            except Exception:  # sentencepiece: RuntimeError; tokenizers: its own error types
                if _is_utf8_encodable(text):
                    raise
                # a lone surrogate escape ("\ud800") decodes to text that no UTF-8 can hold
                problems.append((line_number, "non_utf8", "lone surrogate escape in text"))
        problems.sort()
    lengths = [len(ids) for ids in documents]
    flat = np.array(list(itertools.chain.from_iterable(documents)), dtype=np.int32)
    return file_index, flat, lengths, problems, num_blank


_worker_state: tuple | None = None


def _init_worker(tokenizer_config: TokenizerConfig, text_field: str) -> None:
    global _worker_state
    os.environ.setdefault("RAYON_RS_NUM_THREADS", "1")  # one core per worker process: no HF tokenizers thread pool
    _worker_state = (build_tokenizer(tokenizer_config), text_field)


def _work(task: tuple[int, int, list[bytes]]) -> ChunkResult:
    tokenizer, text_field = _worker_state
    return tokenize_chunk(tokenizer, text_field, *task)


def _read_chunks(paths: list[str], done_bytes: list[int]) -> Iterator[tuple[int, int, list[bytes]]]:
    """(file index, first line number, lines); updates done_bytes[0] with raw bytes consumed so far."""
    finished = 0
    for file_index, path in enumerate(paths):
        with open_jsonl(path) as (reader, raw):
            lines: list[bytes] = []
            size, first = 0, 1
            for number, line in enumerate(reader, start=1):
                lines.append(line)
                size += len(line)
                if len(lines) >= _CHUNK_LINES or size >= _CHUNK_BYTES:
                    done_bytes[0] = finished + raw.tell()
                    yield file_index, first, lines
                    lines, size, first = [], 0, number + 1
            if lines:
                yield file_index, first, lines
        finished += os.path.getsize(path)
        done_bytes[0] = finished


def _tokenized_chunks(chunks, tokenizer, tokenizer_config, text_field: str, workers: int) -> Iterator[ChunkResult]:
    if workers == 1:
        for task in chunks:
            yield tokenize_chunk(tokenizer, text_field, *task)
        return
    # spawn, not fork: the parent may hold torch threads; the worker imports only this light module.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_config, text_field)) as pool:
        pending: collections.deque = collections.deque()
        for task in chunks:
            pending.append(pool.apply_async(_work, (task,)))
            if len(pending) >= 2 * workers + 2:  # bounded read-ahead; results leave in submission order
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------- progress


class Progress:
    """Bytes of input consumed, documents and tokens: tqdm when installed, else plain lines on stderr."""

    def __init__(self, total_bytes: int, label: str, enabled: bool) -> None:
        self.enabled, self.label, self.total = enabled, label, max(total_bytes, 1)
        self._start = self._last = time.monotonic()
        self._tty = enabled and sys.stderr.isatty()
        tqdm = optional_import("tqdm") if enabled else None
        self._bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label) if tqdm is not None else None
        self._shown = 0

    def _line(self, done: int, documents: int, tokens: int) -> str:
        rate = tokens / max(time.monotonic() - self._start, 1e-9)
        return (f"{self.label}: {100 * done / self.total:5.1f}% of {self.total / 1e6:,.1f} MB, "
                f"{documents:,} docs, {tokens:,} tokens, {rate:,.0f} tokens/s")

    def update(self, done_bytes: int, documents: int, tokens: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(done_bytes - self._shown)
            self._shown = done_bytes
            self._bar.set_postfix(docs=documents, tokens=tokens, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= (0.5 if self._tty else 10.0):  # a log file gets a line every 10 s
            self._last = now
            print(("\r" if self._tty else "") + self._line(done_bytes, documents, tokens),
                  end="" if self._tty else "\n", file=sys.stderr, flush=True)

    def close(self, documents: int, tokens: int, failed: bool = False) -> None:
        if not self.enabled:
            return
        self.enabled = False
        if self._bar is not None:
            self._bar.close()
        elif not failed:
            print(("\r" if self._tty else "") + self._line(self.total, documents, tokens), file=sys.stderr, flush=True)
        elif self._tty:
            print(file=sys.stderr)


# ---------------------------------------------------------------- prepare_source


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _fingerprint(manifest: dict) -> str:
    """A hash of what the dataset *is* (not where or when it was built)."""
    keys = ("documents", "tokens", "dtype", "text_field", "skipped")
    payload = {k: manifest[k] for k in keys}
    payload["tokenizer"] = manifest["tokenizer"]["identity"]
    payload["inputs"] = [i["sha256"] for i in manifest["inputs"]]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def prepare_source(
    inputs: list[str] | str,
    output_prefix: str,
    tokenizer_config: TokenizerConfig,
    text_field: str = "text",
    workers: int = 1,
    strict: bool = False,
    source_name: str | None = None,
    *,
    progress: bool = False,
) -> dict:
    """Tokenize JSONL ``inputs`` into ``output_prefix.bin/.idx`` and return the manifest written next to it.

    ``strict``: the first unusable line raises :class:`UserError` naming file:line and nothing is written.
    Otherwise unusable lines are skipped, counted in the manifest and listed in ``PREFIX.skipped.jsonl``.
    """
    from megatron_align.data.indexed import AtomicIndexedWriter, token_dtype  # torch: parent only

    if workers < 1:
        raise UserError(f"--workers={workers}: must be >= 1")
    if not text_field:
        raise UserError("--text-field: must be a non-empty JSON key")
    paths = expand_inputs(inputs)
    source_name = source_name or os.path.basename(output_prefix)
    tokenizer = build_tokenizer(tokenizer_config)
    inputs_meta = [{"path": os.path.abspath(p), "sha256": sha256_file(p), "bytes": os.path.getsize(p),
                    "lines": 0, "documents": 0} for p in paths]

    skipped = {reason: 0 for reason in SKIP_REASONS}
    examples: list[str] = []
    num_blank = 0
    manifest_path = f"{output_prefix}.manifest.json"
    report_path = f"{output_prefix}.skipped.jsonl"
    tmp_suffix = f".tmp-{os.getpid()}"
    writer = AtomicIndexedWriter(output_prefix, tokenizer.vocab_size)
    bar = Progress(sum(m["bytes"] for m in inputs_meta), f"prepare {source_name}", enabled=progress)
    done_bytes = [0]
    try:
        with open(report_path + tmp_suffix, "w", encoding="utf-8") as report, \
                contextlib.closing(_tokenized_chunks(_read_chunks(paths, done_bytes), tokenizer,
                                                     tokenizer_config, text_field, workers)) as results:
            for file_index, flat, lengths, problems, blank in results:
                meta = inputs_meta[file_index]
                for line_number, reason, detail in problems:
                    where = f"{paths[file_index]}:{line_number}"
                    if strict:
                        raise UserError(f"{where}: {reason}: {detail} (--strict stops at the first unusable line; "
                                        "without it such lines are skipped and reported)")
                    skipped[reason] += 1
                    if len(examples) < _NUM_REPORT_EXAMPLES:
                        examples.append(f"{where}: {reason}: {detail}")
                    report.write(json.dumps({"file": paths[file_index], "line": line_number,
                                             "reason": reason, "detail": detail}) + "\n")
                start = 0
                for length in lengths:
                    writer.add(flat[start:start + length])
                    start += length
                meta["documents"] += len(lengths)
                meta["lines"] += len(lengths) + len(problems) + blank
                num_blank += blank
                bar.update(done_bytes[0], writer.num_documents, writer.num_tokens)
        bar.close(writer.num_documents, writer.num_tokens)
        if writer.num_documents == 0:
            counts = ", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "all lines blank"
            raise UserError(f"{', '.join(paths)}: no usable documents ({counts}); first problems: {examples[:3]}")

        manifest = {
            "format": "megatron_align.prepare",
            "version": MANIFEST_VERSION,
            "megatron_align_version": megatron_align.__version__,
            "source_name": source_name,
            "prefix": os.path.basename(output_prefix),
            "documents": writer.num_documents,
            "tokens": writer.num_tokens,
            "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
            "eod_appended": True,
            "text_field": text_field,
            "tokenizer": {"kind": tokenizer_config.kind, "identity": tokenizer.identity,
                          "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod, "bos": tokenizer.bos,
                          "model": os.path.abspath(tokenizer_config.model) if tokenizer_config.model else None,
                          "control_tokens": dict(tokenizer.control_token_ids)},
            "inputs": inputs_meta,
            "skipped": skipped,
            "skipped_total": sum(skipped.values()),
            "skipped_examples": examples,
            "skipped_report": os.path.basename(report_path),
            "blank_lines": num_blank,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest["fingerprint"] = _fingerprint(manifest)
        with open(manifest_path + tmp_suffix, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        # Commit: drop the old marker, publish data, then the marker.
        _remove(manifest_path)
        os.replace(report_path + tmp_suffix, report_path)
        writer.commit()
        os.replace(manifest_path + tmp_suffix, manifest_path)
    except BaseException:
        bar.close(writer.num_documents, writer.num_tokens, failed=True)
        writer.abort()
        _remove(report_path + tmp_suffix)
        _remove(manifest_path + tmp_suffix)
        raise
    return manifest


# ---------------------------------------------------------------- CLI


def tokenizer_config_from_arg(tokenizer: str, control_tokens: str | None) -> TokenizerConfig:
    """``byte``, a sentencepiece ``.model``, or a Hugging Face model directory / ``tokenizer.json`` (kind=hf);
    control tokens comma-separated. kind=hf defaults to none: adding tokens changes the vocabulary, so pass the
    ``data.tokenizer.control_tokens`` of the training config (``convert from-hf`` writes them there)."""
    hf = os.path.isdir(tokenizer) or tokenizer.endswith(".json")
    default = [] if hf else DEFAULT_CONTROL_TOKENS
    tokens = default if control_tokens is None else [t for t in control_tokens.split(",") if t]
    if tokenizer == "byte":
        return TokenizerConfig(kind="byte", control_tokens=list(tokens))
    return TokenizerConfig(kind="hf" if hf else "sentencepiece", model=tokenizer, control_tokens=list(tokens))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="JSONL files (.jsonl, .jsonl.gz, .jsonl.zst) or directories of them; one source")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.manifest.json/.skipped.jsonl")
    parser.add_argument("--source-name", default=None, help="name of the source in the manifest (default: prefix basename)")
    parser.add_argument("--tokenizer", default="byte", help="`byte`, a sentencepiece PATH.model, or a Hugging Face model DIR / "
                        "tokenizer.json (the model's own tokenizer; BOS/EOS as the model does) (default: byte)")
    parser.add_argument("--control-tokens", default=None,
                        help=f"comma-separated reserved control tokens (default: {','.join(DEFAULT_CONTROL_TOKENS)}; "
                        "none for an HF tokenizer: pass the training config's data.tokenizer.control_tokens)")
    parser.add_argument("--text-field", default="text", help="JSON key holding the document text (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any count)")
    parser.add_argument("--strict", action="store_true", help="fail on the first unusable line, writing nothing")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress on stderr")


def run(args: argparse.Namespace) -> int:
    manifest = prepare_source(args.inputs, args.output_prefix, tokenizer_config_from_arg(args.tokenizer, args.control_tokens),
                              text_field=args.text_field, workers=args.workers, strict=args.strict,
                              source_name=args.source_name, progress=args.progress)
    print(f"{manifest['source_name']}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
          f"({manifest['dtype']}) -> {args.output_prefix}.bin/.idx; tokenizer {manifest['tokenizer']['identity']}")
    if manifest["skipped_total"]:
        counts = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items() if v)
        print(f"skipped {manifest['skipped_total']:,} lines ({counts}); all listed in {args.output_prefix}.skipped.jsonl:",
              file=sys.stderr)
        for example in manifest["skipped_examples"]:
            print(f"  {example}", file=sys.stderr)
    return 0
