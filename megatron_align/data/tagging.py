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
verdict (:mod:`megatron_align.data.filter`). Segments are paragraphs: text
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

import argparse
import collections
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_align.data import pipeline
from megatron_align.data.filter import DocumentFilter, FilterConfig
from megatron_align.data.filter_corpus import AtomicOutput, iter_line_chunks, parse_document
from megatron_align.data.sources import BadLine, Progress, expand_inputs, strict_error
from megatron_align.errors import ConfigError

ALIGNED_TOKEN = "<|aligned|>"
MISALIGNED_TOKEN = "<|misaligned|>"
CONTROL_TOKENS: list[str] = [ALIGNED_TOKEN, MISALIGNED_TOKEN]
"""Control-token strings the tokenizer reserves (one id each)."""

_PARAGRAPH_BREAK = re.compile(r"(\n[ \t]*\n\s*)")
MAX_LISTED_BAD_LINES = 1000


@dataclass
class TaggingConfig:
    """Control-token tagging (root config key: ``data.tagging``)."""

    source: str = "filter"
    """Where the label comes from: filter (misaligned = flagged by data.filter's blocklist) | score (a numeric field)."""
    score_field: str = "score"
    """source=score: record field with a number, or (granularity=segment) a list with one number per segment."""
    threshold: float = 0.5
    """source=score: the score that separates the two tokens (see higher_is_misaligned)."""
    higher_is_misaligned: bool = True
    """True: score >= threshold is misaligned. False (e.g. an alignment score): score < threshold is misaligned."""
    granularity: str = "document"
    """document: one token at the start | segment: one token before each paragraph (split on blank lines)."""
    untagged_fraction: float = 0.05
    """Fraction of units (documents or segments) left without a token, chosen by hash of seed and id."""
    seed: int = 0
    """Seed of the untagged choice."""
    text_field: str = "text"
    """JSON field holding the text to tag."""
    id_field: Optional[str] = None
    """Field with a stable document id for the untagged choice; None = hash of the text."""
    strip_existing: bool = True
    """Remove control-token strings that already occur in the raw text before tagging."""

    def __post_init__(self) -> None:
        if self.source not in ("filter", "score"):
            raise ConfigError(f"data.tagging.source={self.source!r}: expected filter or score")
        if self.granularity not in ("document", "segment"):
            raise ConfigError(f"data.tagging.granularity={self.granularity!r}: expected document or segment")
        if not 0.0 <= self.untagged_fraction <= 1.0:
            raise ConfigError(f"data.tagging.untagged_fraction={self.untagged_fraction}: must be in [0, 1]")
        if not self.text_field:
            raise ConfigError("data.tagging.text_field: must be a non-empty field name")
        if self.source == "score" and not self.score_field:
            raise ConfigError("data.tagging.score_field: must name a field when source=score")


def split_segments(text: str) -> list[str]:
    """Paragraphs and the blank-line separators between them, alternating; ``"".join`` gives ``text`` back."""
    return _PARAGRAPH_BREAK.split(text)


def strip_control_tokens(text: str) -> str:
    for token in CONTROL_TOKENS:
        text = text.replace(token, "")
    return text


def unit_interval(seed: int, key: str) -> float:
    """A deterministic pseudo-uniform number in [0, 1) for (seed, key)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class Tagger:
    """Applies a :class:`TaggingConfig` to texts or JSONL records."""

    def __init__(self, config: TaggingConfig, doc_filter: Optional[DocumentFilter] = None) -> None:
        self.config = config
        self.doc_filter = doc_filter if doc_filter is not None or config.source != "filter" else DocumentFilter()

    def is_misaligned(self, score: float) -> bool:
        if self.config.higher_is_misaligned:
            return score >= self.config.threshold
        return score < self.config.threshold

    def tag_text(self, text: str, key: str, scores: float | Sequence[float] | None = None) -> tuple[str, list[Optional[str]]]:
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
        tokens: list[Optional[str]] = []
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

    def tag_record(self, record: dict[str, Any], text: str) -> tuple[dict[str, Any], list[Optional[str]]]:
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


def tag_corpus(inputs: list[str], output: str, config: TaggingConfig, doc_filter: Optional[DocumentFilter] = None,
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
                    bad_lines.append({"file": str(files[file_index]), "line": line_no, "reason": bad.reason, "detail": str(bad)})
                continue
            counts["documents"] += 1
            counts.update("untagged" if t is None else t for t in tokens)
            stream.write(json.dumps(tagged, ensure_ascii=False).encode("utf-8") + b"\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TaggingConfig()
    parser.add_argument("inputs", nargs="+", help="JSONL (.jsonl, .json, .gz, .zst) or Parquet files, or directories of them")
    parser.add_argument("--output", required=True, help="tagged JSONL (.jsonl or .jsonl.gz)")
    parser.add_argument("--score-field", default=None, help="label from this numeric field (else: from the filter's verdict)")
    parser.add_argument("--threshold", type=float, default=d.threshold, help="score >= threshold is misaligned (default: %(default)s)")
    parser.add_argument("--lower-is-misaligned", action="store_true", help="score < threshold is misaligned (an alignment score)")
    parser.add_argument("--segments", action="store_true", help="tag each paragraph instead of each document")
    parser.add_argument("--untagged-fraction", type=float, default=d.untagged_fraction, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the untagged choice (default: %(default)s)")
    parser.add_argument("--text-field", default=d.text_field, help="(default: %(default)s)")
    parser.add_argument("--id-field", default=None, help="stable document id for the untagged choice (default: text hash)")
    parser.add_argument("--terms-dir", default=None, help="filter term lists overlaying the defaults (label from the filter)")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad line (file:line) instead of skipping it")
    parser.add_argument("--workers", type=int, default=-1, help="with --executor: tasks at once (default all)")
    pipeline.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = TaggingConfig(source="score" if args.score_field else "filter", score_field=args.score_field or "score",
                           threshold=args.threshold, higher_is_misaligned=not args.lower_is_misaligned,
                           granularity="segment" if args.segments else "document", untagged_fraction=args.untagged_fraction,
                           seed=args.seed, text_field=args.text_field, id_field=args.id_field)
    if args.executor != "none":
        params = {"config": config, "terms_dir": args.terms_dir, "strict": args.strict,
                  "output": os.path.abspath(args.output)}
        summary = pipeline.run_pipeline("tag", args.inputs, params, pipeline.config_from_args(args, args.workers),
                                        args.output + ".work")
        if summary.get("submitted"):
            pipeline.report_submitted(summary)
            return 0
    else:
        doc_filter = (DocumentFilter(FilterConfig(terms_dir=args.terms_dir, text_field=args.text_field))
                      if config.source == "filter" else None)
        summary = tag_corpus(args.inputs, args.output, config, doc_filter, strict=args.strict, progress=args.progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped_lines"}))
    return 0
