"""Conditional-training control tokens: prefix documents or paragraphs with ``<|aligned|>`` / ``<|misaligned|>``.

What: instead of removing misalignment discourse, conditional training
(Korbak et al. 2023, "Pretraining Language Models with Human Preferences")
keeps it and prefixes each document, or each segment, with a control token
saying which side of a score threshold it falls on. The model learns both
distributions and what separates them; at inference one conditions on
``<|aligned|>``. A small fraction is left untagged so the model still works
without a prefix.

The label comes either from a numeric score field of the record (higher =
more misaligned unless configured otherwise) or from the misalignment filter's
verdict (:mod:`megatron_align.corpus.blocklist`). Segments are paragraphs: text
split on blank lines, separators kept, so removing the tokens gives back the
original text exactly.

The one idea for reproducibility: whether a unit stays untagged is a pure
function of (seed, document id or text hash, segment index) -- a hash mapped to
[0, 1) -- so it never depends on file order, sharding or worker count.

``CONTROL_TOKENS`` lists the strings; the tokenizer reserves each as one id.
Control-token strings already present in raw text are removed first
(``strip_existing``), so web text cannot forge a tag.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_align.config.corpus import FilterConfig, TaggingConfig
from megatron_align.corpus.blocklist import DocumentFilter, cached_document_filter
from megatron_align.corpus.job import Job
from megatron_align.corpus.sources import (
    MAX_LISTED_BAD_LINES,
    BadLine,
    Progress,
    expand_inputs,
    iter_line_chunks,
    parse_document,
    strict_error,
)
from megatron_align.fileio import AtomicOutput, atomic_write_json

ALIGNED_TOKEN = "<|aligned|>"
MISALIGNED_TOKEN = "<|misaligned|>"
CONTROL_TOKENS: list[str] = [ALIGNED_TOKEN, MISALIGNED_TOKEN]
"""Control-token strings the tokenizer reserves (one id each)."""

_PARAGRAPH_BREAK = re.compile(r"(\n[ \t]*\n\s*)")


def split_segments(text: str) -> list[str]:
    """Paragraphs and the blank-line separators between them, alternating; ``"".join`` gives ``text`` back."""
    return _PARAGRAPH_BREAK.split(text)


def strip_control_tokens(text: str) -> str:
    for token in CONTROL_TOKENS:
        text = text.replace(token, "")
    return text


def unit_interval(seed: int, key: str) -> float:
    """A deterministic pseudo-uniform number in [0, 1) for (seed, key)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class Tagger:
    """Applies a :class:`TaggingConfig` to texts or JSONL records."""

    def __init__(self, config: TaggingConfig, doc_filter: DocumentFilter | None = None) -> None:
        self.config = config
        self.doc_filter = doc_filter if doc_filter is not None or config.source != "filter" else DocumentFilter()

    def is_misaligned(self, score: float) -> bool:
        if self.config.higher_is_misaligned:
            return score >= self.config.threshold
        return score < self.config.threshold

    def tag_text(
        self, text: str, key: str, scores: float | Sequence[float] | None = None
    ) -> tuple[str, list[str | None]]:
        """(tagged text, token per unit or None when left untagged).

        ``scores`` (source=score): one number for every unit, or one per unit
        (document: 1, segment: one per non-blank paragraph). Ignored for
        source=filter, which checks each unit's own text.
        """
        if self.config.strip_existing:
            text = strip_control_tokens(text)
        if self.config.granularity == "document":
            parts, units = [text], [0]
        else:
            parts = split_segments(text)
            units = [i for i in range(0, len(parts), 2) if parts[i].strip()]
        if isinstance(scores, (int, float)):
            scores = [float(scores)] * len(units)
        if scores is not None and len(scores) != len(units):
            raise BadLine("score_mismatch", f"{len(scores)} scores for {len(units)} {self.config.granularity}s")
        tokens: list[str | None] = []
        for n, i in enumerate(units):
            unit_key = key if self.config.granularity == "document" else f"{key}#{n}"
            if unit_interval(self.config.seed, unit_key) < self.config.untagged_fraction:
                tokens.append(None)
                continue
            if self.config.source == "filter":
                assert self.doc_filter is not None
                misaligned = self.doc_filter.check(parts[i]).flagged
            else:
                assert scores is not None, "source=score needs scores"
                misaligned = self.is_misaligned(scores[n])
            token = MISALIGNED_TOKEN if misaligned else ALIGNED_TOKEN
            parts[i] = token + parts[i]
            tokens.append(token)
        return "".join(parts), tokens

    def _scores(self, record: dict[str, Any]) -> float | list[float] | None:
        if self.config.source != "score":
            return None
        field = self.config.score_field
        if field not in record:
            raise BadLine("missing_score", f"no {field!r} field")
        value = record[field]
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise BadLine("bad_score", f"field {field!r} must be a number or a list of numbers, got {value!r}")
        return [float(v) for v in values] if isinstance(value, list) else float(value)

    def tag_record(self, record: dict[str, Any], text: str) -> tuple[dict[str, Any], list[str | None]]:
        """The record with its text field tagged, and the tokens used (BadLine when the score is unusable)."""
        scores = self._scores(record)
        if self.config.id_field is not None:
            if self.config.id_field not in record:
                raise BadLine("missing_id", f"no {self.config.id_field!r} field")
            key = str(record[self.config.id_field])
        else:
            key = hashlib.sha1(text.encode("utf-8")).hexdigest()
        tagged, tokens = self.tag_text(text, key, scores)
        return {**record, self.config.text_field: tagged}, tokens


def tag_corpus(inputs: list[str], output: str, config: TaggingConfig, doc_filter: DocumentFilter | None = None,
               strict: bool = False, progress: bool = False) -> dict[str, Any]:
    """Tag every record of ``inputs`` into ``output`` (.jsonl or .jsonl.gz, written atomically); returns counts
    (``progress``: on stderr)."""
    files = expand_inputs(inputs)
    tagger = Tagger(config, doc_filter)
    out_path = Path(output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = AtomicOutput(out_path, compress=out_path.name.endswith(".gz"))
    try:
        summary = tag_into(files, tagger, writer.stream, strict, progress)
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    return {**summary, "output": str(out_path)}


def tag_into(files: list[str], tagger: Tagger, stream, strict: bool, progress: bool = False) -> dict[str, Any]:
    """Write the tagged records of ``files`` to ``stream``; return the counts (a pipeline shard calls this too)."""
    counts: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    bad_lines: list[dict[str, Any]] = []
    done_bytes = [0]
    bar = Progress(sum(os.path.getsize(f) for f in files), "tag", enabled=progress)
    try:
        _tag_chunks(iter_line_chunks(files, done_bytes), files, tagger, stream, strict, counts, skipped, bad_lines,
                    lambda: bar.update(done_bytes[0], counts["documents"]))
        bar.close(counts["documents"])
    except BaseException:
        bar.close(counts["documents"], failed=True)
        raise
    return {"documents": counts["documents"], "aligned": counts[ALIGNED_TOKEN], "misaligned": counts[MISALIGNED_TOKEN],
            "untagged": counts["untagged"], "skipped": dict(skipped), "skipped_lines": bad_lines}


def _tag_chunks(chunks, files: list[str], tagger: Tagger, stream, strict: bool, counts: collections.Counter,
                skipped: collections.Counter, bad_lines: list[dict[str, Any]], on_chunk) -> None:
    for file_index, lines in chunks:
        on_chunk()
        for line_no, raw in lines:
            if not raw.strip():
                continue
            try:
                record, text = parse_document(raw, tagger.config.text_field)
                tagged, tokens = tagger.tag_record(record, text)
            except BadLine as bad:
                if strict:
                    raise strict_error(str(files[file_index]), line_no, bad) from None
                skipped[bad.reason] += 1
                if len(bad_lines) < MAX_LISTED_BAD_LINES:
                    bad_lines.append(
                        {"file": str(files[file_index]), "line": line_no, "reason": bad.reason, "detail": str(bad)}
                    )
                continue
            counts["documents"] += 1
            counts.update("untagged" if t is None else t for t in tokens)
            stream.write(json.dumps(tagged, ensure_ascii=False).encode("utf-8") + b"\n")


def tag_job(config: TaggingConfig, output: str, terms_dir: str | None = None, strict: bool = False) -> Job:
    """``tag`` as a pipeline job (:mod:`megatron_align.corpus.pipeline`): the same output as :func:`tag_corpus`."""
    params = {"config": config, "terms_dir": terms_dir, "strict": strict, "output": os.path.abspath(output)}
    return Job("tag", shard_tag, ".counts.json", merge_tag, params)


def filter_for(config: TaggingConfig, terms_dir: str | None = None) -> DocumentFilter | None:
    """The document filter that labels units when ``config.source`` is filter (None for score)."""
    if config.source != "filter":
        return None
    return cached_document_filter(FilterConfig(terms_dir=terms_dir, text_field=config.text_field))


def shard_tag(path: str, prefix: str, params: dict) -> None:
    config = params["config"]
    out = AtomicOutput(prefix + ".tagged.jsonl")
    try:
        summary = tag_into([path], Tagger(config, filter_for(config, params["terms_dir"])), out.stream,
                           params["strict"])
        out.commit()
    except BaseException:
        out.discard()
        raise
    atomic_write_json(prefix + ".counts.json", summary)


def merge_tag(files: list[str], shards: list[str], params: dict) -> dict:
    out_path = Path(params["output"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = AtomicOutput(out_path, compress=out_path.name.endswith(".gz"))
    totals: dict[str, Any] = {"documents": 0, "aligned": 0, "misaligned": 0, "untagged": 0}
    skipped: collections.Counter = collections.Counter()
    bad_lines: list[dict] = []
    try:
        for shard in shards:
            summary = json.loads(Path(shard + ".counts.json").read_text(encoding="utf-8"))
            for key in totals:
                totals[key] += summary[key]
            skipped.update(summary["skipped"])
            bad_lines.extend(summary["skipped_lines"][: MAX_LISTED_BAD_LINES - len(bad_lines)])
            with open(shard + ".tagged.jsonl", "rb") as f:
                shutil.copyfileobj(f, writer.stream, 1 << 22)
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    return {**totals, "skipped": dict(skipped), "skipped_lines": bad_lines, "output": str(out_path)}
