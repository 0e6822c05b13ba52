"""data.tokenizer.kind=hf: a tokenizer.json through `tokenizers`, with the model's own BOS/EOS conventions.

The tokenizers are small byte-level BPEs trained here (conftest.make_bpe_tokenizer): one written like Llama 3
(BOS added by the post-processor), one like Qwen (no BOS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_bpe_tokenizer
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_align.cli import main
from megatron_align.config.corpus import TokenizerConfig
from megatron_align.config.loader import config_from_dict
from megatron_align.corpus.prepare import prepare_source, tokenizer_config_from_arg
from megatron_align.corpus.tokenizer import build_tokenizer, encode_documents
from megatron_align.errors import ConfigError, UserError

tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["The quick brown fox.", "naïve café 日本語 \N{ROBOT FACE}", "tagged <|aligned|> text", "  leading spaces"]


@pytest.fixture
def llama_like(tmp_path):
    make_bpe_tokenizer(tmp_path / "llama", bos=True)
    return tmp_path / "llama"


@pytest.fixture
def qwen_like(tmp_path):
    make_bpe_tokenizer(tmp_path / "qwen", bos=False)
    return tmp_path / "qwen"


def _raw(path, controls=()):
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    if controls:
        tok.add_special_tokens(list(controls))
    return tok


@pytest.mark.parametrize("which", ["llama_like", "qwen_like"])
def test_prepare_ids_equal_tokenizers_ids_with_the_models_bos_and_eos(tmp_path, request, which):
    path = request.getfixturevalue(which)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    controls = ["<|aligned|>", "<|misaligned|>"]
    manifest = prepare_source(str(docs), str(tmp_path / "out"), TokenizerConfig(kind="hf", model=str(path),
                                                                                control_tokens=controls), workers=2)
    raw = _raw(path, controls)
    # what transformers' own tokenizer gives with special tokens: BOS for Llama-like, nothing for Qwen-like
    with_specials = [raw.encode(t).ids for t in TEXTS]
    eos = raw.token_to_id("<|end_of_text|>" if which == "llama_like" else "<|endoftext|>")
    dataset = IndexedDataset(str(tmp_path / "out"))
    for i, text in enumerate(TEXTS):
        assert list(np.asarray(dataset[i])) == with_specials[i] + [eos], text
    plain = raw.encode(TEXTS[2], add_special_tokens=False).ids
    assert raw.token_to_id("<|aligned|>") in plain  # one id for the control token
    bos = 0 if which == "llama_like" else None
    assert manifest["tokenizer"]["bos"] == bos and manifest["tokenizer"]["eod"] == eos
    assert manifest["tokenizer"]["kind"] == "hf" and manifest["tokenizer"]["identity"].startswith("hf:")


def test_control_tokens_are_added_as_special_tokens_growing_the_vocabulary(llama_like):
    plain = build_tokenizer(TokenizerConfig(kind="hf", model=str(llama_like), control_tokens=[]))
    tagged = build_tokenizer(TokenizerConfig(kind="hf", model=str(llama_like / "tokenizer.json")))
    assert plain.vocab_size == 300 and tagged.vocab_size == 302
    assert tagged.control_token_ids == {"<|aligned|>": 300, "<|misaligned|>": 301}
    assert tagged.added_control_tokens == ["<|aligned|>", "<|misaligned|>"]
    assert tagged.encode("x<|misaligned|>y").count(301) == 1 and 301 not in plain.encode("x<|misaligned|>y")
    assert tagged.decode(tagged.encode("a <|aligned|> b")) == "a <|aligned|> b"
    assert plain.identity != tagged.identity
    # a token the tokenizer already has keeps its id and is not added again
    kept = build_tokenizer(TokenizerConfig(kind="hf", model=str(llama_like), control_tokens=["<|end_of_text|>"]))
    assert kept.control_token_ids == {"<|end_of_text|>": 1} and kept.vocab_size == 300 and not kept.added_control_tokens


def test_identity_covers_the_full_tokenizer_content(tmp_path, llama_like):
    copy = tmp_path / "copy"
    shutil.copytree(llama_like, copy)
    identity = lambda p: build_tokenizer(TokenizerConfig(kind="hf", model=str(p))).identity  # noqa: E731
    assert identity(copy) == identity(llama_like)  # content, not path
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False  # an explicit rule overrides the post-processor ...
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    changed = build_tokenizer(TokenizerConfig(kind="hf", model=str(copy)))
    assert changed.bos is None and encode_documents(changed, ["hi"])[0][0] != 0
    assert changed.identity != identity(llama_like)  # ... and is a different tokenization
    (copy / "generation_config.json").write_text("{}")
    assert build_tokenizer(TokenizerConfig(kind="hf", model=str(copy))).identity != changed.identity


def test_errors_name_the_key_or_file(tmp_path, llama_like):
    with pytest.raises(ConfigError, match="data.tokenizer.model: required"):
        TokenizerConfig(kind="hf")
    with pytest.raises(UserError, match="tokenizer.json does not exist"):
        build_tokenizer(TokenizerConfig(kind="hf", model=str(tmp_path)))
    config = json.loads((llama_like / "tokenizer_config.json").read_text())
    (llama_like / "tokenizer_config.json").write_text(json.dumps(dict(config, eos_token="<|nope|>")))
    with pytest.raises(UserError, match="eos_token='<\\|nope\\|>' is not a token"):
        build_tokenizer(TokenizerConfig(kind="hf", model=str(llama_like)))
    (llama_like / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(UserError, match="tokenizer_config.json: not valid JSON"):
        build_tokenizer(TokenizerConfig(kind="hf", model=str(llama_like)))


def test_cli_and_config_select_the_hf_tokenizer(tmp_path, qwen_like, capsys):
    assert tokenizer_config_from_arg(str(qwen_like), None) == TokenizerConfig(kind="hf", model=str(qwen_like),
                                                                              control_tokens=[])
    assert (
        config_from_dict({"data": {"tokenizer": {"kind": "hf", "model": str(qwen_like)}}}).data.tokenizer.kind == "hf"
    )
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"text": "hello world"}) + "\n")
    assert main(["prepare", str(docs), "--output-prefix", str(tmp_path / "p"), "--tokenizer",
                 str(qwen_like / "tokenizer.json"), "--no-progress"]) == 0
    assert "tokenizer hf:" in capsys.readouterr().out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a one-core machine's pool has one thread anyway")
def test_prepare_workers_pin_the_tokenizers_pool_to_one_thread(qwen_like):
    """A worker's first batch starts tokenizers' rayon pool: one thread, not one per core (--workers N uses N cores)."""
    script = f"""
import os
from megatron_align.corpus import prepare
from megatron_align.config.corpus import TokenizerConfig
prepare._init_worker(TokenizerConfig(kind="hf", model={str(qwen_like)!r}), "text")
before = len(os.listdir("/proc/self/task"))
prepare._work((0, 1, [b'{{"text": "one document"}}', b'{{"text": "and another"}}'] * 64))
print(len(os.listdir("/proc/self/task")) - before)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYON") and k != "TOKENIZERS_PARALLELISM"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) <= 1, result.stdout
