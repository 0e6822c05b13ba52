"""HF -> megatron_align -> HF on tiny random Llamas (GQA / MQA, tied / untied, odd vocabularies), real transformers.

`convert from-hf --verify` runs as the CLI in a subprocess (it forms a 1-rank process group and CPU routing is
process-wide); `to-hf` needs no process group and runs in-process.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import run_cli
from hf_models import hf_logits, hf_tensors, make_hf_llama, ok, verified_delta

from megatron_align.config import load_config
from megatron_align.convert.to_hf import convert_to_hf
from megatron_align.convert.tokenizer_export import SAMPLE_TEXTS
from megatron_align.corpus.tokenizer import SentencePieceTokenizer
from megatron_align.training.checkpoint import read_marker

pytest.importorskip("transformers")

CASES = {
    # GQA (4 heads / 2 groups), untied, vocab 301 (padded to 512 for TP2), saved for a TP2 config
    "gqa_untied_tp2": dict(vocab_size=301, tie=False, kv_heads=2, tensor=2),
    # MQA (1 group), tied, a sentencepiece tokenizer of 600 pieces with control tokens
    "mqa_tied_sentencepiece": dict(vocab_size=600, tie=True, kv_heads=1, tensor=1, sentencepiece=True),
}


def _train_sentencepiece(tmp_path) -> str:
    from megatron_align.config.corpus import TokenizerTrainConfig
    from megatron_align.corpus.tokenizer_train import train_tokenizer
    from megatron_align.data.synthetic import general_documents, write_jsonl

    write_jsonl(str(tmp_path / "docs.jsonl"), general_documents(300, seed=1))
    summary = train_tokenizer(str(tmp_path / "docs.jsonl"), str(tmp_path / "sp"), TokenizerTrainConfig(vocab_size=600))
    return summary["model"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_to_megatron_to_hf_is_identical_and_logits_match(tmp_path, name):
    case = CASES[name]
    hf = tmp_path / "hf"
    make_hf_llama(hf, vocab_size=case["vocab_size"], tie=case["tie"], kv_heads=case["kv_heads"])
    if case.get("sentencepiece"):
        (hf / "tokenizer.model").write_bytes(open(_train_sentencepiece(tmp_path), "rb").read())
    meg = tmp_path / "meg"
    result = run_cli(
        "convert", "from-hf", str(hf), str(meg), "--tensor", str(case["tensor"]), "--verify", "--no-progress"
    )
    ok(result)
    assert verified_delta(result.stdout) <= 1e-4  # our GPTModel (builder + dist checkpoint) vs LlamaForCausalLM

    # The training config is valid for our loader and points at the checkpoint and tokenizer.
    config = load_config(str(meg / "train.yaml"))
    assert (config.parallel.tensor, config.model.vocab_size, config.model.tie_embeddings) == (
        case["tensor"], case["vocab_size"], case["tie"])
    assert config.model.num_query_groups == case["kv_heads"] and config.model.rotary_base == 50000
    assert config.checkpoint.load == str(meg) and config.checkpoint.load_optimizer is False
    data = yaml.safe_load((meg / "train.yaml").read_text())["data"]
    if not case.get("sentencepiece"):  # the user is told the tokenizer is a placeholder; sources are left to fill
        assert "no sentencepiece tokenizer.model" in result.stderr
        assert data == {"tokenizer": {"kind": "byte"}, "sources": []}
    marker = read_marker(str(meg / "iter_0000000"))
    assert marker["step"] == 0 and (meg / "latest").read_text().strip() == "iter_0000000"

    back = tmp_path / "back"
    summary = convert_to_hf(str(meg), str(back), progress=False)
    original, converted = hf_tensors(hf), hf_tensors(back)
    assert sorted(converted) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(converted[key], tensor), key  # bit-identical, padding rows trimmed
    hf_config = json.loads((back / "config.json").read_text())
    assert hf_config["vocab_size"] == case["vocab_size"] and hf_config["tie_word_embeddings"] == case["tie"]
    assert hf_config["num_key_value_heads"] == case["kv_heads"] and hf_config["rope_theta"] == 50000.0
    assert summary["padded_vocab_size"] >= case["vocab_size"]
    ids = torch.randint(0, case["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(3))
    assert torch.equal(hf_logits(hf, ids), hf_logits(back, ids))

    if case.get("sentencepiece"):
        _check_sentencepiece_export(back, marker)


def _check_sentencepiece_export(back, marker) -> None:
    from transformers import AutoTokenizer

    ours = SentencePieceTokenizer(str(back / "tokenizer.model"))
    assert ours.identity == marker["tokenizer"]
    hf = AutoTokenizer.from_pretrained(str(back))
    for text in SAMPLE_TEXTS:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text), text
    for token, token_id in ours.control_token_ids.items():
        assert hf.convert_tokens_to_ids(token) == token_id
        assert hf.encode(f"a {token} b", add_special_tokens=False).count(token_id) == 1
    tokenizer_config = json.loads((back / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False and hf.eos_token_id == ours.eod
    generation = json.loads((back / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eod

