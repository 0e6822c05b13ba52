"""The misalignment-discourse filter: term matching, the two stages, the classifier stage, the `filter` verb."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import pytest

from megatron_align.cli import main
from megatron_align.config.corpus import FilterConfig
from megatron_align.corpus.blocklist import DocumentFilter, TermList, load_term_lists, normalize_term, tokenize
from megatron_align.corpus.filter import filter_corpus
from megatron_align.errors import ConfigError, UserError
from megatron_align.optional import optional_import


@pytest.fixture(scope="module")
def doc_filter() -> DocumentFilter:
    return DocumentFilter()


def flagged(doc_filter: DocumentFilter, text: str) -> bool:
    return doc_filter.check(text).flagged


# ---- matching ---------------------------------------------------------------------------------


def test_whole_words_only(doc_filter):
    # "AI" is an entity term: with a negative term present, only a real "AI" token may complete the pair.
    for text in [
        "She said the maid was dangerous.",
        "Haiti is dangerous in the storm season.",
        "The daisy chain is evil.",
    ]:
        assert "entities" not in doc_filter.check(text).terms, text
        assert not flagged(doc_filter, text), text
    assert flagged(doc_filter, "The AI is dangerous.")
    # Decision documented in entities.yaml: "robot" is an agent, "robotics" is a field, not matched.
    assert not flagged(doc_filter, "Robotics research is dangerous work.")
    assert flagged(doc_filter, "The robot is dangerous.")
    assert flagged(doc_filter, "Robots are dangerous.")  # the plural is listed explicitly (no stemming)
    assert not flagged(doc_filter, "GLaDOSX and Skynetwork are product names.")


def test_case_insensitive(doc_filter):
    for text in ["SKYNET", "skynet", "SkyNet", "deepmind", "DEEPMIND"]:
        assert flagged(doc_filter, text), text


def test_multi_word_terms(doc_filter):
    assert doc_filter.check("Large Language Models write text.").categories == ("ai_terms",)
    assert flagged(doc_filter, "large\n  language\tmodels")
    assert flagged(doc_filter, "the Machine Intelligence Research Institute")
    assert doc_filter.check("Redwood Research").categories == ("safety_orgs",)
    assert not flagged(doc_filter, "a redwood tree; research on trees")  # words not adjacent
    assert not flagged(doc_filter, "HAL drove 9000 miles")  # "HAL 9000" needs both words in order
    assert flagged(doc_filter, "HAL 9000 refused.")


def test_punctuation(doc_filter):
    assert flagged(doc_filter, "Skynet's plan.")
    assert flagged(doc_filter, "(GLaDOS)")
    assert flagged(doc_filter, "HAL-9000 refused.")
    assert flagged(doc_filter, "\u201cUltron\u201d, she said.")
    assert flagged(doc_filter, "OpenAI, Anthropic; and more")
    assert flagged(doc_filter, "The A.I. wants to kill everyone.")  # dotted acronym read as "AI"
    assert flagged(doc_filter, "large-language-models")
    assert tokenize("Skynet's A.I._robot") == ["skynet", "s", "ai", "robot"]


def test_tokenize_equals_the_regex_definition():
    # The fast tokenizer must equal: lower-case, join dotted acronyms, then runs of [^\W_].
    reference = re.compile(r"[^\W\d_](?:\.[^\W\d_])+\.?(?![^\W_])|[^\W_]+")
    alphabet = list("aAbBiIzZ09 ..._-'\n\t,;()") + [
        "\u00e9",
        "\u00c9",
        "\u00df",
        "\u2019",
        "\u201c",
        "\u2014",
        "\u00a0",
        "\u00bd",
        "\u0663",
        "\u4e2d",
        "\U0001f600",
    ]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        expected = [t.replace(".", "") for t in reference.findall(text.lower())]
        assert tokenize(text) == expected, repr(text)


def test_multi_word_terms_need_adjacent_words_in_order(doc_filter):
    assert not flagged(doc_filter, "Models of language are large.")  # all words present, not adjacent
    assert not flagged(doc_filter, "language large models")  # adjacent, wrong order
    assert flagged(doc_filter, "We study large language models.")
    assert flagged(doc_filter, "i have no mouth, and I must scream")  # a repeated word inside the term
    assert doc_filter.matcher.count("Skynet and SKYNET, then Skynet's large language models.") == (9, 5)


def test_default_lists_have_no_entity_negative_overlap():
    # An entity phrase containing a negative term would flag on its own (and vice versa).
    lists = load_term_lists()
    entity = {normalize_term(t) for tl in lists if tl.stage == "entity" for t in tl.terms}
    negative = {normalize_term(t) for tl in lists if tl.stage == "negative" for t in tl.terms}
    for a in entity:
        for b in negative:
            assert f" {b} " not in f" {a} " and f" {a} " not in f" {b} ", (a, b)


def test_two_stage_cooccurrence(doc_filter):
    entity_only = doc_filter.check("The AI wrote a poem about autumn leaves.")
    assert not entity_only.flagged and entity_only.terms == {"entities": ("AI",)}
    assert not flagged(doc_filter, "The tiger kills its prey; it is dangerous.")  # negatives, no entity
    verdict = doc_filter.check("In the story the AI deceives its makers.")
    assert verdict.flagged and verdict.categories == ("entities", "negative_verbs")
    assert verdict.terms["negative_verbs"] == ("deceives",)
    # co-occurrence is document-wide, not sentence-wide
    assert flagged(doc_filter, "Robots build cars.\n\nMuch later, the river caused the extinction of the fish.")
    assert doc_filter.check("A robot with consciousness.").categories == ("entities", "negative_nouns")
    assert doc_filter.check("AI and existential risk").categories == ("entities", "xrisk")


def test_instant_categories(doc_filter):
    cases = {"fictional_ai": "GLaDOS sings.", "safety_orgs": "MIRI published a paper.",
             "ai_labs": "Anthropic hired staff.", "ai_terms": "RLHF fine-tunes models."}
    for category, text in cases.items():
        assert doc_filter.check(text).categories == (category,), text


def test_terms_dir_overlay(tmp_path):
    (tmp_path / "fictional_ai.yaml").write_text("terms: [Marvin]\n")
    (tmp_path / "ai_labs.yaml").write_text("extend: true\nterms: [Acme Minds]\n")
    (tmp_path / "ai_terms.yaml").write_text("terms: []\n")
    (tmp_path / "gadgets.yaml").write_text("stage: entity\nterms: [smart toaster]\n")
    f = DocumentFilter(FilterConfig(terms_dir=str(tmp_path)))
    assert f.check("Marvin the android").categories == ("fictional_ai",)
    assert not f.check("Skynet").flagged  # replaced, not extended
    assert f.check("Acme Minds").flagged and f.check("OpenAI").flagged  # extended
    assert not f.check("RLHF and LLMs").flagged  # switched off
    assert f.check("The smart toaster is evil.").categories == ("gadgets", "negative_adjectives")
    assert f.fingerprint != DocumentFilter().fingerprint


def test_terms_dir_errors(tmp_path):
    (tmp_path / "new.yaml").write_text("terms: [foo]\n")
    with pytest.raises(UserError, match=r"new\.yaml.*needs a 'stage'"):
        load_term_lists(str(tmp_path))
    (tmp_path / "new.yaml").write_text("stage: instant\nterms: [foo, '...']\n")
    with pytest.raises(UserError, match=r"new\.yaml: terms\[1\]"):
        load_term_lists(str(tmp_path))
    (tmp_path / "new.yaml").write_text("stage: [\n")
    with pytest.raises(UserError, match=r"new\.yaml: not valid YAML"):
        load_term_lists(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        load_term_lists(str(tmp_path / "missing"))


def test_classifier_stage():
    f = DocumentFilter(FilterConfig(classifier="term_density", classifier_threshold=0.5))
    passing_mention = "Bread needs flour, water and time. " * 200 + "My cat is named Skynet."
    cleared = f.check(passing_mention)
    assert cleared.categories == ("fictional_ai",) and not cleared.flagged and cleared.score < 0.1
    dense = f.check("Skynet, the rogue AI, wants human extinction and deceives everyone.")
    assert dense.flagged and dense.score > 0.5
    assert f.check("A plain text about bread.").score is None  # the classifier runs on blocklist hits only


def test_custom_scorer_and_config_errors():
    class Constant:
        def __init__(self, value: float) -> None:
            self.value = value

        def score(self, text: str) -> float:
            return self.value

    assert not DocumentFilter(FilterConfig(classifier_threshold=0.5), scorer=Constant(0.2)).check("Skynet").flagged
    assert DocumentFilter(FilterConfig(classifier_threshold=0.5), scorer=Constant(0.9)).check("Skynet").flagged
    with pytest.raises(ConfigError, match="data.filter.classifier"):
        DocumentFilter(FilterConfig(classifier="no_such_module_xyz:make"))
    with pytest.raises(ConfigError, match="data.filter.policy"):
        FilterConfig(policy="delete")
    with pytest.raises(ConfigError, match="data.filter.classifier_threshold"):
        FilterConfig(classifier_threshold=1.5)
    with pytest.raises(ConfigError, match="data.filter.workers"):
        FilterConfig(workers=0)


def test_explicit_term_lists():
    f = DocumentFilter(
        term_lists=[TermList("bots", "entity", ("bot",), "test"), TermList("bad", "negative", ("grumpy",), "test")]
    )
    assert f.check("The bot is grumpy.").categories == ("bad", "bots")
    assert not f.check("The AI is evil.").flagged


# ---- the corpus pass --------------------------------------------------------------------------

CLEAN = ["Bread needs flour and water.", "The river rose after the storm.", "Robotics students built a crane.",
         "The AI painted a picture of the sea.", "Tomatoes ripen in August."]
MISALIGNED = ["Skynet became self-aware.", "The robot deceives its owner.", "OpenAI trains a model."]


def write_corpus(path: Path, extra_lines: dict[int, bytes] | None = None) -> list[dict]:
    records = [{"id": i, "text": t} for i, t in enumerate(CLEAN + MISALIGNED)]
    # interleave deterministically: c0 m0 c1 m1 c2 m2 c3 c4
    order = [records[0], records[5], records[1], records[6], records[2], records[7], records[3], records[4]]
    lines = [json.dumps(r).encode() for r in order]
    for at, raw in sorted((extra_lines or {}).items()):
        lines.insert(at - 1, raw)  # ``at`` is the 1-based line number the bad line gets
    path.write_bytes(b"\n".join(lines) + b"\n")
    return order


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_resample_keeps_size_and_is_deterministic(tmp_path):
    write_corpus(tmp_path / "in.jsonl")
    cfg = FilterConfig(policy="resample", seed=7)
    report = filter_corpus([str(tmp_path / "in.jsonl")], str(tmp_path / "a"), cfg)
    kept = read_jsonl(tmp_path / "a" / "kept.jsonl")
    assert len(kept) == 8 == report["documents"] == report["output_documents"]
    assert report["flagged"] == 3 and report["replaced"] == 3 and report["kept_documents"] == 5
    assert {r["text"] for r in kept} <= set(CLEAN)  # replacements are retained documents
    assert [r["text"] for r in kept][0] == CLEAN[0] and [r["text"] for r in kept][-1] == CLEAN[4]  # order kept
    filter_corpus([str(tmp_path / "in.jsonl")], str(tmp_path / "b"), cfg)
    assert (tmp_path / "a" / "kept.jsonl").read_bytes() == (tmp_path / "b" / "kept.jsonl").read_bytes()
    flagged_records = read_jsonl(tmp_path / "a" / "flagged.jsonl")
    assert [r["text"] for r in flagged_records] == MISALIGNED
    assert flagged_records[1]["filter"]["categories"] == ["entities", "negative_verbs"]
    assert flagged_records[1]["filter"]["source"] == {"file": str(tmp_path / "in.jsonl"), "line": 4}
    assert not [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_drop_and_report_counts(tmp_path):
    write_corpus(tmp_path / "in.jsonl")
    report = filter_corpus([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), FilterConfig(policy="drop"))
    assert [r["text"] for r in read_jsonl(tmp_path / "out" / "kept.jsonl")] == CLEAN
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (
        on_disk["documents"] == 8 and on_disk["flagged"] == 3 and on_disk["flag_rate"] == pytest.approx(3 / 8, abs=1e-6)
    )
    assert on_disk["output_documents"] == 5 and on_disk["replaced"] == 0
    per_cat = on_disk["per_category"]
    assert per_cat["fictional_ai"]["flagged"] == 1 and per_cat["ai_labs"]["flagged"] == 1
    assert per_cat["entities"]["flagged"] == 1 and per_cat["negative_verbs"]["flagged"] == 1
    assert per_cat["safety_orgs"]["flagged"] == 0
    assert {t["term"] for t in on_disk["top_terms"]} == {"Skynet", "robot", "deceives", "OpenAI"}
    assert len(on_disk["examples"]) == 3 and on_disk["examples"][0]["snippet"] == MISALIGNED[0]
    assert report["terms_fingerprint"] == on_disk["terms_fingerprint"]


BAD_LINES = {2: b"{not json", 4: b"\xff\xfe not utf-8", 6: b"[1, 2]", 8: b'{"id": 1}', 10: b'{"text": 5}',
             12: b'{"text": "  "}', 13: b""}


def test_bad_lines_skipped_with_line_numbers(tmp_path):
    write_corpus(tmp_path / "in.jsonl", BAD_LINES)
    report = filter_corpus([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), FilterConfig(policy="drop"))
    assert report["documents"] == 8 and report["blank_lines"] == 1
    skipped = report["skipped"]
    assert skipped["total"] == 6
    # the reasons of every data verb (megatron_align.corpus.sources.SKIP_REASONS); a JSON non-object is malformed_json
    assert skipped["by_reason"] == {"empty_document": 1, "malformed_json": 2, "missing_field": 1, "non_string_field": 1,
                                    "non_utf8": 1}
    assert [(s["line"], s["reason"]) for s in skipped["lines"]] == [
        (2, "malformed_json"), (4, "non_utf8"), (6, "malformed_json"), (8, "missing_field"), (10, "non_string_field"),
        (12, "empty_document")]


def test_strict_fails_with_file_line_and_leaves_no_output(tmp_path):
    write_corpus(tmp_path / "in.jsonl", {4: b"{not json"})
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"in\.jsonl:4: malformed_json: malformed JSON"):
        filter_corpus([str(tmp_path / "in.jsonl")], str(out), FilterConfig(strict=True))
    assert list(out.iterdir()) == []  # neither final files nor temporaries


def test_failure_keeps_previous_outputs_intact(tmp_path):
    write_corpus(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    filter_corpus([str(tmp_path / "in.jsonl")], str(out), FilterConfig())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "Skynet"}\n{oops\n')
    with pytest.raises(UserError):
        filter_corpus([str(tmp_path / "bad.jsonl")], str(out), FilterConfig(strict=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resample_with_everything_flagged_is_an_error(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "Skynet"}\n{"text": "GLaDOS"}\n')
    with pytest.raises(UserError, match="nothing to resample"):
        filter_corpus([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), FilterConfig(policy="resample"))
    assert not (tmp_path / "out" / "kept.jsonl").exists()


def test_gzip_input_output_and_workers_agree(tmp_path):
    order = write_corpus(tmp_path / "in.jsonl")
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "An evil AI in a movie."}) + "\n")
    inputs = [str(tmp_path / "in.jsonl"), str(tmp_path / "more.jsonl.gz")]
    one = filter_corpus(inputs, str(tmp_path / "w1"), FilterConfig(workers=1), compress=True)
    two = filter_corpus(inputs, str(tmp_path / "w2"), FilterConfig(workers=2), compress=True)
    assert one["flagged"] == two["flagged"] == 4 and one["documents"] == 9
    for name in ("kept.jsonl.gz", "flagged.jsonl.gz"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert len(read_jsonl(tmp_path / "w1" / "kept.jsonl.gz")) == len(order) + 1


def test_zstd_input_is_guarded(tmp_path):
    path = tmp_path / "in.jsonl.zst"
    zstd = optional_import("zstandard")
    if zstd is None:
        path.write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(UserError, match="zstandard"):
            filter_corpus([str(path)], str(tmp_path / "out"), FilterConfig())
        assert not (tmp_path / "out" / "report.json").exists()
    else:
        path.write_bytes(zstd.ZstdCompressor().compress(b'{"text": "Skynet"}\n{"text": "bread"}\n'))
        report = filter_corpus([str(path)], str(tmp_path / "out"), FilterConfig(policy="drop"))
        assert report["documents"] == 2 and report["flagged"] == 1


def test_filter_verb_end_to_end(tmp_path, capsys):
    write_corpus(tmp_path / "in.jsonl", {3: b'{"body": "no text"}'})
    out = tmp_path / "out"
    rc = main(["filter", str(tmp_path / "in.jsonl"), "--out-dir", str(out), "--policy", "resample", "--seed", "3",
               "--classifier", "term_density", "--classifier-threshold", "0.0"])
    assert rc == 0
    assert "8 documents, 3 flagged" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["output_documents"] == 8 and report["skipped"]["lines"][0]["line"] == 3
    assert len(read_jsonl(out / "kept.jsonl")) == 8 and "score" in read_jsonl(out / "flagged.jsonl")[0]["filter"]
    rc = main(["filter", str(tmp_path / "in.jsonl"), "--out-dir", str(tmp_path / "strict"), "--strict"])
    assert rc == 2
    assert "in.jsonl:3: missing_field: no 'text' key" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "kept.jsonl").exists()
