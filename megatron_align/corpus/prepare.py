"""The ``prepare`` verb: JSONL or Parquet documents (:mod:`megatron_align.corpus.sources`) -> one Megatron
IndexedDataset per source (:mod:`megatron_align.corpus.indexed`).

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

Pipeline (:func:`prepare_job`): a shard is one file prepared as its own source; the merge concatenates the
``.bin/.idx`` pairs (:func:`~megatron_align.corpus.indexed.merge_indexed`) and adds up the manifests.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import megatron_align
from megatron_align.config.corpus import DEFAULT_CONTROL_TOKENS, TokenizerConfig
from megatron_align.corpus.indexed import AtomicIndexedWriter, merge_indexed, token_dtype
from megatron_align.corpus.job import Job
from megatron_align.corpus.sources import (
    SKIP_REASONS,
    BadLine,
    Progress,
    describe,
    expand_inputs,
    iter_chunks,
    parse_unit,
    sha256_file,
    strict_error,
)
from megatron_align.corpus.tokenizer import build_tokenizer, encode_documents
from megatron_align.errors import UserError

MANIFEST_VERSION = 1
_CHUNK_LINES = 1024
_CHUNK_BYTES = 1 << 20
_NUM_REPORT_EXAMPLES = 10


# ---------------------------------------------------------------- tokenizing chunks

# A chunk result: (file index, flat token ids with EOD after each document, per-document lengths,
# [(line number, reason, detail)], blank lines).
ChunkResult = tuple[int, np.ndarray, list[int], list[tuple[int, str, str]], int]


def tokenize_chunk(tokenizer, text_field: str, file_index: int, first_line: int, lines: list[bytes]) -> ChunkResult:
    texts: list[tuple[int, str]] = []
    problems: list[tuple[int, str, str]] = []
    num_blank = 0
    for offset, line in enumerate(lines):
        try:
            _, text = parse_unit(line, text_field)
        except BadLine as bad:
            problems.append((first_line + offset, bad.reason, str(bad)))
            continue
        if text is None:
            num_blank += 1
            continue
        texts.append((first_line + offset, text))
    # One batch per chunk (HF tokenizers encode it on their thread pool); text no UTF-8 can hold (a lone
    # surrogate escape) was already skipped as non_utf8 by parse_unit.
    documents = encode_documents(tokenizer, [text for _, text in texts])
    lengths = [len(ids) for ids in documents]
    flat = np.fromiter(itertools.chain.from_iterable(documents), dtype=np.int32, count=sum(lengths))  # no list copy
    return file_index, flat, lengths, problems, num_blank


_worker_state: tuple | None = None


def _init_worker(tokenizer_config: TokenizerConfig, text_field: str) -> None:
    global _worker_state
    # one core per worker process: no HF tokenizers thread pool (rayon reads RAYON_NUM_THREADS; the old
    # RAYON_RS_NUM_THREADS is ignored by the tokenizers wheels in use, measured: 2 threads ran with it set to 1)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    _worker_state = (build_tokenizer(tokenizer_config), text_field)


def _work(task: tuple[int, int, list[bytes]]) -> ChunkResult:
    tokenizer, text_field = _worker_state
    return tokenize_chunk(tokenizer, text_field, *task)


def _read_chunks(paths: list[str], text_field: str, done_bytes: list[int]) -> Iterator[tuple[int, int, list[bytes]]]:
    """(file index, first line number, lines) of at most one file each; done_bytes[0]: input bytes consumed."""
    for file_index, chunk in iter_chunks(paths, text_field, done_bytes, _CHUNK_BYTES, _CHUNK_LINES):
        yield file_index, chunk[0][0], [line for _, line in chunk]


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
    allow_empty: bool = False,
) -> dict:
    """Tokenize JSONL/Parquet ``inputs`` into ``output_prefix.bin/.idx`` and return the manifest written next to it.

    ``strict``: the first unusable line raises :class:`UserError` naming file:line and nothing is written.
    Otherwise unusable lines are skipped, counted in the manifest and listed in ``PREFIX.skipped.jsonl``.
    ``allow_empty``: a source without usable documents is written (one shard of a pipeline) instead of refused.
    """
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
    report_path = f"{output_prefix}.skipped.jsonl"
    tmp_suffix = f".tmp-{os.getpid()}"
    writer = AtomicIndexedWriter(output_prefix, tokenizer.vocab_size)
    bar = Progress(sum(m["bytes"] for m in inputs_meta), f"prepare {source_name}", enabled=progress,
                   tokens=True)
    done_bytes = [0]
    try:
        with open(report_path + tmp_suffix, "w", encoding="utf-8") as report, \
                contextlib.closing(_tokenized_chunks(_read_chunks(paths, text_field, done_bytes), tokenizer,
                                                     tokenizer_config, text_field, workers)) as results:
            for file_index, flat, lengths, problems, blank in results:
                meta = inputs_meta[file_index]
                for line_number, reason, detail in problems:
                    if strict:
                        raise strict_error(paths[file_index], line_number, BadLine(reason, detail))
                    skipped[reason] += 1
                    if len(examples) < _NUM_REPORT_EXAMPLES:
                        examples.append(describe(paths[file_index], line_number, reason, detail))
                    report.write(json.dumps({"file": paths[file_index], "line": line_number,
                                             "reason": reason, "detail": detail}) + "\n")
                writer.add_documents(flat, lengths)
                meta["documents"] += len(lengths)
                meta["lines"] += len(lengths) + len(problems) + blank
                num_blank += blank
                bar.update(done_bytes[0], writer.num_documents, writer.num_tokens)
        bar.close(writer.num_documents, writer.num_tokens)
        if writer.num_documents == 0 and not allow_empty:
            raise_no_documents(paths, skipped, examples)
        manifest = build_manifest(source_name, output_prefix, writer.num_documents, writer.num_tokens, text_field,
                                  tokenizer_config, tokenizer, inputs_meta, skipped, examples, num_blank)
        publish(output_prefix, manifest, report_path + tmp_suffix, writer.commit)
    except BaseException:
        bar.close(writer.num_documents, writer.num_tokens, failed=True)
        writer.abort()
        _remove(report_path + tmp_suffix)
        raise
    return manifest


def raise_no_documents(paths: list[str], skipped: dict[str, int], examples: list[str]) -> None:
    counts = ", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "all lines blank"
    raise UserError(f"{', '.join(paths)}: no usable documents ({counts}); first problems: {examples[:3]}")


def build_manifest(source_name: str, output_prefix: str, documents: int, tokens: int, text_field: str,
                   tokenizer_config: TokenizerConfig, tokenizer, inputs_meta: list[dict], skipped: dict[str, int],
                   examples: list[str], num_blank: int) -> dict:
    """The manifest of a finished source (also of a pipeline's merged one: the same keys, the same fingerprint)."""
    manifest = {
        "format": "megatron_align.prepare",
        "version": MANIFEST_VERSION,
        "megatron_align_version": megatron_align.__version__,
        "source_name": source_name,
        "prefix": os.path.basename(output_prefix),
        "documents": documents,
        "tokens": tokens,
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
        "skipped_examples": examples[:_NUM_REPORT_EXAMPLES],
        "skipped_report": os.path.basename(f"{output_prefix}.skipped.jsonl"),
        "blank_lines": num_blank,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    manifest["fingerprint"] = _fingerprint(manifest)
    return manifest


def publish(output_prefix: str, manifest: dict, report_tmp: str, commit_data) -> None:
    """Commit a source: drop the old marker, publish the report and data (``commit_data()``), the manifest last."""
    manifest_path = f"{output_prefix}.manifest.json"
    tmp = f"{manifest_path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        _remove(manifest_path)
        os.replace(report_tmp, f"{output_prefix}.skipped.jsonl")
        commit_data()
        os.replace(tmp, manifest_path)
    finally:
        _remove(tmp)


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


# ---------------------------------------------------------------- pipeline (megatron_align.corpus.pipeline)


def prepare_job(tokenizer_config: TokenizerConfig, output_prefix: str, text_field: str = "text", strict: bool = False,
                source_name: str | None = None) -> Job:
    """``prepare`` as a pipeline job: the same files as :func:`prepare_source` (manifest, fingerprint included)."""
    params = {"tokenizer_config": tokenizer_config, "text_field": text_field, "strict": strict,
              "source_name": source_name, "output_prefix": os.path.abspath(output_prefix)}
    return Job("prepare", shard_prepare, ".manifest.json", merge_prepare, params, tokens=True)


def shard_prepare(path: str, prefix: str, params: dict) -> None:
    prepare_source([path], prefix, params["tokenizer_config"], text_field=params["text_field"], workers=1,
                   strict=params["strict"], source_name="shard", allow_empty=True)


def merge_prepare(files: list[str], shards: list[str], params: dict) -> dict:
    prefix = params["output_prefix"]
    documents = tokens = blank = 0
    inputs_meta: list[dict] = []
    skipped = {reason: 0 for reason in SKIP_REASONS}
    examples: list[str] = []
    report_tmp = f"{prefix}.skipped.jsonl.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    try:
        with open(report_tmp, "wb") as report:
            for shard in shards:
                m = json.loads(Path(shard + ".manifest.json").read_text(encoding="utf-8"))
                documents, tokens, blank = documents + m["documents"], tokens + m["tokens"], blank + m["blank_lines"]
                inputs_meta.extend(m["inputs"])
                for reason, n in m["skipped"].items():
                    skipped[reason] += n
                examples.extend(m["skipped_examples"][: _NUM_REPORT_EXAMPLES - len(examples)])
                with open(shard + ".skipped.jsonl", "rb") as f:
                    shutil.copyfileobj(f, report)
        if documents == 0:
            raise_no_documents(files, skipped, examples)
        config = params["tokenizer_config"]
        manifest = build_manifest(params["source_name"] or os.path.basename(prefix), prefix, documents, tokens,
                                  params["text_field"], config, build_tokenizer(config), inputs_meta, skipped,
                                  examples, blank)

        def commit() -> None:
            merged = merge_indexed(shards, prefix)
            if merged != (documents, tokens):
                raise RuntimeError(
                    f"merged {merged} documents/tokens but the shard manifests say {(documents, tokens)}"
                )

        publish(prefix, manifest, report_tmp, commit)
    finally:
        if os.path.exists(report_tmp):
            os.remove(report_tmp)
    return manifest
