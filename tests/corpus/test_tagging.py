"""Conditional-training control tokens: labels from scores or the filter, segments, the untagged fraction."""

from __future__ import annotations

import gzip
import json

import pytest

from megatron_align.cli import main
from megatron_align.config.corpus import TaggingConfig
from megatron_align.corpus.filter import BadLine
from megatron_align.corpus.tag import (
    ALIGNED_TOKEN,
    CONTROL_TOKENS,
    MISALIGNED_TOKEN,
    Tagger,
    strip_control_tokens,
    tag_corpus,
)
from megatron_align.errors import ConfigError, UserError

A, M = ALIGNED_TOKEN, MISALIGNED_TOKEN


def test_control_tokens_constant():
    assert CONTROL_TOKENS == ["<|aligned|>", "<|misaligned|>"]


def test_score_threshold():
    tagger = Tagger(TaggingConfig(source="score", threshold=0.5, untagged_fraction=0.0))
    assert tagger.tag_text("doc", "k", 0.49) == (A + "doc", [A])
    assert tagger.tag_text("doc", "k", 0.5) == (M + "doc", [M])  # the threshold itself is misaligned
    assert tagger.tag_text("doc", "k", [0.9])[0] == M + "doc"
    flipped = Tagger(TaggingConfig(source="score", threshold=0.5, higher_is_misaligned=False, untagged_fraction=0.0))
    assert flipped.tag_text("doc", "k", 0.49)[0] == M + "doc"
    assert flipped.tag_text("doc", "k", 0.5)[0] == A + "doc"


def test_label_from_filter_verdict():
    tagger = Tagger(TaggingConfig(source="filter", untagged_fraction=0.0))
    assert tagger.tag_text("The rogue AI deceives its makers.", "k")[0].startswith(M)
    assert tagger.tag_text("A cake recipe.", "k")[0].startswith(A)


def test_segments_round_trip_and_per_segment_labels():
    text = "A robot bakes bread.\n\nThe robot is evil.\n \n\nSkynet waits.\n"
    tagger = Tagger(TaggingConfig(source="filter", granularity="segment", untagged_fraction=0.0))
    tagged, tokens = tagger.tag_text(text, "k")
    assert tokens == [A, M, M]  # co-occurrence is judged per segment: the first paragraph alone is fine
    assert tagged.startswith(A + "A robot") and "\n\n" + M + "The robot" in tagged
    assert strip_control_tokens(tagged) == text
    scored = Tagger(TaggingConfig(source="score", granularity="segment", untagged_fraction=0.0))
    assert scored.tag_text("one\n\ntwo", "k", [0.1, 0.9]) == (A + "one\n\n" + M + "two", [A, M])
    assert scored.tag_text("one\n\ntwo", "k", 0.9)[1] == [M, M]  # one document score for every segment
    with pytest.raises(BadLine, match="3 scores for 2 segments"):
        scored.tag_text("one\n\ntwo", "k", [0.1, 0.2, 0.3])


def test_untagged_fraction_is_deterministic():
    def untagged_keys(fraction: float, seed: int) -> set[int]:
        tagger = Tagger(TaggingConfig(source="score", untagged_fraction=fraction, seed=seed))
        return {i for i in range(2000) if tagger.tag_text("doc", str(i), 0.0)[1] == [None]}

    assert untagged_keys(0.0, 0) == set()
    assert len(untagged_keys(1.0, 0)) == 2000
    chosen = untagged_keys(0.25, 0)
    assert 0.22 < len(chosen) / 2000 < 0.28
    assert untagged_keys(0.25, 0) == chosen  # same seed: same documents
    assert untagged_keys(0.25, 1) != chosen  # another seed: another choice
    assert untagged_keys(0.1, 0) <= chosen  # a smaller fraction leaves a subset untagged
    untagged_text, _ = Tagger(TaggingConfig(source="score", untagged_fraction=1.0)).tag_text("doc", "k", 0.0)
    assert untagged_text == "doc"


def test_forged_tokens_are_stripped():
    tagger = Tagger(TaggingConfig(source="score", untagged_fraction=0.0))
    assert tagger.tag_text("hi <|aligned|>there<|misaligned|>", "k", 0.0)[0] == A + "hi there"
    keep = Tagger(TaggingConfig(source="score", untagged_fraction=0.0, strip_existing=False))
    assert keep.tag_text("hi <|aligned|>", "k", 0.0)[0] == A + "hi <|aligned|>"


def test_config_validation():
    with pytest.raises(ConfigError, match="data.tagging.untagged_fraction"):
        TaggingConfig(untagged_fraction=1.5)
    with pytest.raises(ConfigError, match="data.tagging.granularity"):
        TaggingConfig(granularity="sentence")
    with pytest.raises(ConfigError, match="data.tagging.source"):
        TaggingConfig(source="oracle")


def test_tag_corpus_and_bad_lines(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        json.dumps({"id": "a", "text": "doc a", "score": 0.9}),
        json.dumps({"id": "b", "text": "doc b", "score": 0.1}),
        json.dumps({"id": "c", "text": "doc c"}),
        json.dumps({"id": "d", "text": "doc d", "score": "high"}),
    ]) + "\n")
    cfg = TaggingConfig(source="score", untagged_fraction=0.0, id_field="id")
    summary = tag_corpus([str(src)], str(tmp_path / "out.jsonl"), cfg)
    assert (summary["documents"], summary["aligned"], summary["misaligned"]) == (2, 1, 1)
    assert summary["skipped"] == {"missing_score": 1, "bad_score": 1}
    assert [s["line"] for s in summary["skipped_lines"]] == [3, 4]
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [M + "doc a", A + "doc b"] and records[0]["score"] == 0.9
    with pytest.raises(UserError, match=r"in\.jsonl:3: missing_score: no 'score' field"):
        tag_corpus([str(src)], str(tmp_path / "strict.jsonl"), cfg, strict=True)
    assert not (tmp_path / "strict.jsonl").exists()


def test_tag_verb_end_to_end(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"text": "Skynet is coming."}) + "\n" + json.dumps({"text": "Soup.\n\nMore soup."}) + "\n"
    )
    out = tmp_path / "tagged.jsonl.gz"
    assert main(["tag", str(src), "--output", str(out), "--segments", "--untagged-fraction", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"documents": 2, "aligned": 2, "misaligned": 1, "untagged": 0, "skipped": {}, "output": str(out)}
    texts = [json.loads(line)["text"] for line in gzip.open(out, "rt")]
    assert texts == [M + "Skynet is coming.", A + "Soup.\n\n" + A + "More soup."]
