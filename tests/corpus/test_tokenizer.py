"""Tokenizer training (`tokenizer train`), loading, control tokens and identity hashes."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest

pytest.importorskip("sentencepiece")

from megatron_align.cli import main
from megatron_align.config.corpus import DEFAULT_CONTROL_TOKENS, TokenizerConfig, TokenizerTrainConfig
from megatron_align.corpus.tokenizer import ByteTokenizer, SentencePieceTokenizer, build_tokenizer
from megatron_align.corpus.tokenizer_train import train_tokenizer
from megatron_align.errors import ConfigError, UserError

VOCAB_SIZE = 400


def write_corpus(path, num_documents: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8))) for _ in range(300)]
    texts = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_documents):
            lines = [" ".join(rng.choices(words, k=rng.randint(4, 16))) for _ in range(rng.randint(1, 3))]
            text = ("<|aligned|> " if i % 10 == 0 else "") + "\n".join(lines)
            texts.append(text)
            f.write(json.dumps({"text": text}) + "\n")
    return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_corpus(root / "corpus.jsonl")
    summary = train_tokenizer(
        str(root / "corpus.jsonl"), str(root / "bpe"), TokenizerTrainConfig(vocab_size=VOCAB_SIZE)
    )
    return root, summary


def test_train_writes_model_and_vocab_atomically(trained):
    root, summary = trained
    assert summary["model"] == str(root / "bpe.model") and os.path.isfile(summary["model"])
    with open(root / "bpe.vocab", encoding="utf-8") as f:
        pieces = [line.split("\t")[0] for line in f]
    assert len(pieces) == VOCAB_SIZE == summary["vocab_size"]
    assert pieces[:4] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert pieces[4:6] == DEFAULT_CONTROL_TOKENS
    assert "<0x0A>" in pieces  # byte fallback pieces exist
    assert summary["documents"] == 400 and summary["sentences"] > 400
    assert not [n for n in os.listdir(root) if ".tmp-" in n]


def test_loaded_model_ids_and_control_tokens_are_single_ids(trained):
    _, summary = trained
    tok = build_tokenizer(TokenizerConfig(kind="sentencepiece", model=summary["model"]))
    assert (tok.vocab_size, tok.eod, tok.pad) == (VOCAB_SIZE, 2, 3)
    for name, tid in tok.control_token_ids.items():
        ids = tok.encode(f"before {name}after")
        assert ids.count(tid) == 1
        # no piece of the control token's text leaks into other ids
        assert tok.decode([i for i in ids if i != tid]) == "before after"
    assert summary["control_tokens"] == tok.control_token_ids


def test_round_trip_is_exact_with_byte_fallback(trained):
    tok = SentencePieceTokenizer(trained[1]["model"])
    for text in ["plain words here", "  two  spaces\n\nand lines\t", "unseen: 日本語 ✓ émoji 🙂", "<|misaligned|>x"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok._sp.unk_id() not in tok.encode("日本語 🙂")


def test_identity_is_stable_and_changes_with_the_model(trained, tmp_path):
    root, summary = trained
    assert SentencePieceTokenizer(summary["model"]).identity == summary["identity"]
    again = train_tokenizer(
        str(root / "corpus.jsonl"), str(tmp_path / "again.model"), TokenizerTrainConfig(vocab_size=VOCAB_SIZE)
    )
    assert again["model"] == str(tmp_path / "again.model")  # a .model suffix names the same prefix
    assert again["identity"] == summary["identity"]  # deterministic training
    other = train_tokenizer(str(root / "corpus.jsonl"), str(tmp_path / "uni"),
                            TokenizerTrainConfig(vocab_size=VOCAB_SIZE, model_type="unigram"))
    bigger = train_tokenizer(
        str(root / "corpus.jsonl"), str(tmp_path / "big"), TokenizerTrainConfig(vocab_size=VOCAB_SIZE + 20)
    )
    assert len({summary["identity"], other["identity"], bigger["identity"]}) == 3
    assert other["identity"].startswith("sentencepiece:")


def test_custom_control_tokens_and_missing_ones_are_reported(trained, tmp_path):
    root, summary = trained
    tags = ["<|good|>", "<|bad|>", "<|neutral|>"]
    custom = train_tokenizer(str(root / "corpus.jsonl"), str(tmp_path / "c"),
                             TokenizerTrainConfig(vocab_size=VOCAB_SIZE, control_tokens=tags))
    tok = SentencePieceTokenizer(custom["model"], tags)
    assert list(tok.control_token_ids.values()) == [4, 5, 6]
    with pytest.raises(UserError, match="not a user-defined symbol"):
        SentencePieceTokenizer(summary["model"], tags)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="tokenizer_train.vocab_size"):
        TokenizerTrainConfig(vocab_size=200)
    with pytest.raises(ConfigError, match="tokenizer_train.model_type"):
        TokenizerTrainConfig(model_type="wordpiece")
    with pytest.raises(ConfigError, match="tokenizer_train.character_coverage"):
        TokenizerTrainConfig(character_coverage=0.0)
    with pytest.raises(ConfigError, match="tokenizer_train.control_tokens"):
        TokenizerTrainConfig(control_tokens=["<a>", "<a>"])


def test_cli_trains_and_prints_identity(tmp_path, capsys):
    write_corpus(tmp_path / "c.jsonl.tmp", num_documents=200)
    # a configurable text field, and bad lines that are skipped while reading
    with (
        open(tmp_path / "c.jsonl.tmp", encoding="utf-8") as src,
        open(tmp_path / "c.jsonl", "w", encoding="utf-8") as dst,
    ):
        for line in src:
            dst.write(json.dumps({"body": json.loads(line)["text"]}) + "\n")
        dst.write("not json\n")
    rc = main(
        [
            "tokenizer",
            "train",
            str(tmp_path / "c.jsonl"),
            "--output-prefix",
            str(tmp_path / "out" / "sp"),
            "--vocab-size",
            str(VOCAB_SIZE),
            "--model-type",
            "unigram",
            "--text-field",
            "body",
            "--max-sentences",
            "300",
        ]
    )
    assert rc == 0
    identity = SentencePieceTokenizer(str(tmp_path / "out" / "sp.model")).identity
    assert f"identity {identity}" in capsys.readouterr().out


def test_cli_errors_exit_2(tmp_path, capsys):
    write_corpus(tmp_path / "c.jsonl", num_documents=20)
    rc = main(
        [
            "tokenizer",
            "train",
            str(tmp_path / "c.jsonl"),
            "--output-prefix",
            str(tmp_path / "sp"),
            "--vocab-size",
            "30000",
        ]
    )
    assert rc == 2
    assert "smaller --vocab-size" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "sp.model")
    rc = main(["tokenizer", "train", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "sp")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_byte_tokenizer_round_trip_and_control_ids():
    tok = ByteTokenizer()
    text = "a <|aligned|> é\n<|misaligned|>"
    ids = tok.encode(text)
    assert ids.count(258) == 1 and ids.count(259) == 1
    assert tok.decode(ids) == text
    assert tok.identity == ByteTokenizer().identity != ByteTokenizer(["<x>"]).identity


def test_unreadable_or_textless_inputs_are_user_errors(tmp_path):
    (tmp_path / "none.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(UserError, match="no text to train on.*missing_field"):
        train_tokenizer(str(tmp_path / "none.jsonl"), str(tmp_path / "sp"), TokenizerTrainConfig(vocab_size=VOCAB_SIZE))
    whole = gzip.compress(b'{"text": "some words"}\n' * 5000)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz: cannot read"):
        train_tokenizer(
            str(tmp_path / "cut.jsonl.gz"), str(tmp_path / "sp"), TokenizerTrainConfig(vocab_size=VOCAB_SIZE)
        )
    assert not os.path.exists(tmp_path / "sp.model")
