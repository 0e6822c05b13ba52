"""`prepare`: JSONL -> Megatron IndexedDataset, manifest, skipped-line report, strict mode, determinism."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_align.cli import main
from megatron_align.config.corpus import TokenizerConfig
from megatron_align.corpus import prepare
from megatron_align.corpus.indexed import AtomicIndexedWriter, token_dtype
from megatron_align.corpus.prepare import prepare_source
from megatron_align.corpus.tokenizer import build_tokenizer
from megatron_align.errors import UserError

BYTE = TokenizerConfig(kind="byte")


def make_texts(num_documents: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghij klmnop", k=rng.randint(1, 7))) for _ in range(200)] + ["é", "日本", "🙂"]
    texts = []
    for i in range(num_documents):
        text = "\n".join(" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 3)))
        texts.append(("<|aligned|> " if i % 7 == 0 else "") + text.strip() + f" #{i}")
    return texts


def write_jsonl(path, texts: list[str], field: str = "text") -> str:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text, "id": len(text)}) + "\n")
    return str(path)


def read_documents(prefix: str) -> list[np.ndarray]:
    dataset = IndexedDataset(prefix)
    assert len(dataset.document_indices) == len(dataset) + 1  # one sequence per document
    # copies: the arrays view the dataset's mmap, which closes when the dataset is collected
    return [np.array(dataset[i]) for i in range(len(dataset))]


def outputs(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_round_trip_text_tokens_text_with_eod(tmp_path):
    texts = make_texts(60)
    manifest = prepare_source(write_jsonl(tmp_path / "in.jsonl", texts), str(tmp_path / "out" / "web"), BYTE)
    tok = build_tokenizer(BYTE)
    docs = read_documents(str(tmp_path / "out" / "web"))
    assert len(docs) == manifest["documents"] == 60
    for text, ids in zip(texts, docs):
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1].tolist()
        assert tok.decode(ids[:-1]) == text
    assert sum(len(d) for d in docs) == manifest["tokens"]
    assert outputs(tmp_path / "out") == ["web.bin", "web.idx", "web.manifest.json", "web.skipped.jsonl"]


def test_round_trip_with_sentencepiece(tmp_path):
    pytest.importorskip("sentencepiece")
    from megatron_align.config.corpus import TokenizerTrainConfig
    from megatron_align.corpus.tokenizer_train import train_tokenizer

    texts = make_texts(120)
    corpus = write_jsonl(tmp_path / "in.jsonl", texts)
    model = train_tokenizer(corpus, str(tmp_path / "sp"), TokenizerTrainConfig(vocab_size=320))["model"]
    config = TokenizerConfig(kind="sentencepiece", model=model)
    with open(corpus, "a", encoding="utf-8") as f:
        f.write('{"text": "lone \\udc00 surrogate"}\n')
    manifest = prepare_source(corpus, str(tmp_path / "web"), config)
    assert manifest["skipped"]["non_utf8"] == 1
    tok = build_tokenizer(config)
    docs = read_documents(str(tmp_path / "web"))
    assert [tok.decode(d[:-1]) for d in docs] == texts
    assert all(d[-1] == tok.eod == 2 for d in docs)
    aligned = tok.control_token_ids["<|aligned|>"]
    assert [int((d == aligned).sum()) for d in docs] == [1 if i % 7 == 0 else 0 for i in range(120)]
    assert manifest["tokenizer"]["identity"] == tok.identity and manifest["dtype"] == "uint16"


def test_dtype_follows_vocab_size(tmp_path):
    prepare_source(write_jsonl(tmp_path / "in.jsonl", ["abc"]), str(tmp_path / "small"), BYTE)
    assert IndexedDataset(str(tmp_path / "small")).index.dtype == np.uint16
    assert token_dtype(65499) is np.uint16 and token_dtype(65500) is np.int32
    with AtomicIndexedWriter(str(tmp_path / "big"), vocab_size=70000) as writer:
        writer.add([69999, 5])
    big = IndexedDataset(str(tmp_path / "big"))
    assert big.index.dtype == np.int32 and big[0].tolist() == [69999, 5]


def test_compressed_inputs_give_identical_output(tmp_path):
    texts = make_texts(40)
    prepare_source(write_jsonl(tmp_path / "a.jsonl", texts), str(tmp_path / "plain"), BYTE)
    prepare_source(write_jsonl(tmp_path / "a.jsonl.gz", texts), str(tmp_path / "gz"), BYTE)
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    assert read("plain.bin") == read("gz.bin") and read("plain.idx") == read("gz.idx")
    zstd = pytest.importorskip("zstandard")
    (tmp_path / "a.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress((tmp_path / "a.jsonl").read_bytes()))
    prepare_source(str(tmp_path / "a.jsonl.zst"), str(tmp_path / "zst"), BYTE)
    assert read("plain.bin") == read("zst.bin")


BAD_LINES = [  # (line content, reason or None for a good document)
    (b'{"text": "good one"}', None),
    (b'{"text": "broken', "malformed_json"),
    (b'{"title": "no text"}', "missing_field"),
    (b'{"text": "caf\xe9"}', "non_utf8"),  # latin-1 byte
    (b'{"text": 42}', "non_string_field"),
    (b'{"text": "   \\n "}', "empty_document"),
    (b"", None),  # blank line: ignored, not a document
    (b'["text", "a list"]', "malformed_json"),
    (b'{"text": "lone \\ud800 surrogate"}', "non_utf8"),
    (b'{"text": null}', "non_string_field"),
    (b'{"text": "good two"}', None),
]


def write_bad(path) -> str:
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    return str(path)


def test_every_bad_line_is_skipped_counted_and_reported_with_its_line(tmp_path):
    manifest = prepare_source(write_bad(tmp_path / "bad.jsonl"), str(tmp_path / "web"), BYTE)
    expected = [(n, reason) for n, (_, reason) in enumerate(BAD_LINES, start=1) if reason]
    with open(tmp_path / "web.skipped.jsonl", encoding="utf-8") as f:
        report = [json.loads(line) for line in f]
    assert [(r["line"], r["reason"]) for r in report] == expected
    assert all(r["file"].endswith("bad.jsonl") and r["detail"] for r in report)
    assert manifest["skipped"] == {"non_utf8": 2, "malformed_json": 2, "missing_field": 1,
                                   "non_string_field": 2, "empty_document": 1}
    assert manifest["skipped_total"] == 8 and manifest["blank_lines"] == 1
    assert manifest["skipped_examples"][0].endswith("bad.jsonl:2: malformed_json: " + report[0]["detail"])
    tok = build_tokenizer(BYTE)
    assert [tok.decode(d[:-1]) for d in read_documents(str(tmp_path / "web"))] == ["good one", "good two"]
    assert manifest["inputs"][0]["lines"] == len(BAD_LINES) and manifest["inputs"][0]["documents"] == 2


def test_strict_fails_on_first_bad_line_and_leaves_no_outputs(tmp_path, capsys):
    bad = write_bad(tmp_path / "bad.jsonl")
    out = tmp_path / "out"
    rc = main(["prepare", bad, "--output-prefix", str(out / "web"), "--strict", "--no-progress"])
    assert rc == 2
    assert "bad.jsonl:2: malformed_json" in capsys.readouterr().err
    assert outputs(out) == []
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed_json"):
        prepare_source(bad, str(out / "web"), BYTE, strict=True, workers=2)
    assert outputs(out) == []
    good = write_jsonl(tmp_path / "good.jsonl", ["fine"])
    assert prepare_source(good, str(out / "web"), BYTE, strict=True)["documents"] == 1


def test_no_usable_documents_is_an_error_without_outputs(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"other": 1}\n\n')
    with pytest.raises(UserError, match="no usable documents.*missing_field=1"):
        prepare_source(str(tmp_path / "in.jsonl"), str(tmp_path / "out" / "web"), BYTE)
    assert outputs(tmp_path / "out") == []


def test_workers_do_not_change_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "_CHUNK_LINES", 7)  # many chunks, so order across workers matters
    lines = [json.dumps({"text": t}).encode() for t in make_texts(100)]
    lines[13] = b"{oops"
    lines[58] = b'{"text": ""}'
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    one = prepare_source(str(tmp_path / "in.jsonl"), str(tmp_path / "w1"), BYTE, workers=1)
    two = prepare_source(str(tmp_path / "in.jsonl"), str(tmp_path / "w2"), BYTE, workers=2)
    for ext in (".bin", ".idx", ".skipped.jsonl"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    differs = {k for k in one if one[k] != two[k]}
    assert differs <= {"created", "source_name", "prefix", "skipped_report"}
    assert one["fingerprint"] == two["fingerprint"] and one["documents"] == 98


def test_manifest_contents(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_texts(5, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl.gz", make_texts(3, seed=2), field="body")
    manifest = prepare_source([a, b], str(tmp_path / "web"), BYTE, text_field="body", source_name="web_en")
    with open(tmp_path / "web.manifest.json", encoding="utf-8") as f:
        assert json.load(f) == manifest
    assert manifest["source_name"] == "web_en" and manifest["text_field"] == "body"
    assert manifest["skipped"]["missing_field"] == 5  # a.jsonl has "text", not "body"
    assert (manifest["documents"], manifest["dtype"], manifest["eod_appended"]) == (3, "uint16", True)
    assert manifest["tokenizer"]["identity"] == build_tokenizer(BYTE).identity
    assert manifest["tokenizer"]["vocab_size"] == 512 and manifest["tokenizer"]["eod"] == 256
    assert [i["sha256"] for i in manifest["inputs"]] == [
        hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (a, b)
    ]
    assert [i["documents"] for i in manifest["inputs"]] == [0, 3]
    assert manifest["version"] == 1 and manifest["created"].endswith("+00:00")
    other = prepare_source([a, b], str(tmp_path / "web2"), TokenizerConfig(control_tokens=["<x>"]), text_field="body")
    assert other["fingerprint"] != manifest["fingerprint"]  # a different tokenizer is a different dataset


def test_rerun_replaces_outputs_and_leaves_no_temporaries(tmp_path):
    prefix = str(tmp_path / "web")
    prepare_source(write_jsonl(tmp_path / "in.jsonl", ["one", "two"]), prefix, BYTE)
    manifest = prepare_source(write_jsonl(tmp_path / "in.jsonl", ["three"]), prefix, BYTE)
    assert manifest["documents"] == 1 and len(IndexedDataset(prefix)) == 1
    assert not [n for n in outputs(tmp_path) if ".tmp-" in n]


def test_cli_end_to_end_with_trained_tokenizer_and_directory_input(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "part-0.jsonl", make_texts(80, seed=0))
    write_jsonl(corpus / "part-1.jsonl.gz", make_texts(40, seed=1))
    assert (
        main(["tokenizer", "train", str(corpus), "--output-prefix", str(tmp_path / "tok"), "--vocab-size", "320"]) == 0
    )
    assert main(["prepare", str(corpus), "--output-prefix", str(tmp_path / "data" / "web"),
                 "--tokenizer", str(tmp_path / "tok.model"), "--workers", "2", "--source-name", "web"]) == 0
    captured = capsys.readouterr()
    # summary on stdout; progress on stderr (tqdm's "docs=120" when installed, else plain "120 docs" lines)
    assert "web: 120 documents" in captured.out and ("120 docs" in captured.err or "docs=120" in captured.err)
    manifest = json.loads((tmp_path / "data" / "web.manifest.json").read_text())
    assert [os.path.basename(i["path"]) for i in manifest["inputs"]] == ["part-0.jsonl", "part-1.jsonl.gz"]
    tok = build_tokenizer(TokenizerConfig(kind="sentencepiece", model=str(tmp_path / "tok.model")))
    docs = read_documents(str(tmp_path / "data" / "web"))
    assert [tok.decode(d[:-1]) for d in docs] == make_texts(80, seed=0) + make_texts(40, seed=1)
    assert main(["prepare", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_truncated_compressed_input_is_a_clear_error_without_outputs(tmp_path):
    whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in make_texts(300)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz: cannot read .*complete"):
        prepare_source(str(tmp_path / "cut.jsonl.gz"), str(tmp_path / "out" / "web"), BYTE)
    assert outputs(tmp_path / "out") == []
