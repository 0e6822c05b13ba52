"""Llama 3.x / Mistral / Qwen2 / Qwen3 through the converter, with each model's own tokenizer.

Random transformers models at odd sizes (hidden 96, GQA 6/2, vocab 303 or 300: not multiples of 128) with a
byte-level BPE trained here; Mistral and Qwen3 with a head dim other than hidden / heads (model.kv_channels: 12
and 32, as Mistral-Nemo's 128 < 5120 / 32 and Qwen3-0.6B's 128 > 1024 / 16). Per family: `from-hf --verify`
(our GPTModel vs transformers, fp32), `to-hf` bit-exact with the family, tokenizer files and generation config
carried unchanged; then training under TP2xPP2 on data prepared with the model's tokenizer, with control tokens
added: the first step (lr 0) exports bit-exact, the second (trained) exports with --verify. (Only the Qwen3 training
run, QK norm and a head dim of its own under TP2xPP2, is on both stacks; the others are `single_stack`: they take
the same Megatron-Core path, and every family's import, --verify and round trip run on both stacks above.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, write_yaml
from hf_models import BOS_FAMILIES, hf_logits, hf_tensors, make_hf_family, ok, verified_delta

from megatron_align.convert.checkpoint_report import describe_checkpoint
from megatron_align.convert.families import model_features
from megatron_align.convert.to_hf import convert_to_hf
from megatron_align.errors import UserError

pytest.importorskip("transformers")

CARRIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
CASES = {  # Llama-3.2-style: llama3 RoPE scaling + tied; Qwen2-style tied with q/k/v biases; head_dim != 96 / 6
    "llama": dict(tie=True, rope_llama3=True), "mistral": dict(tie=False, head_dim=12),
    "qwen2": dict(tie=True), "qwen3": dict(tie=False, head_dim=32),
}


def _llama(**extra):
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 96, "vocab_size": 300}
    return dict(base, **extra)


LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
REFUSED = {
    "gpt_neox": (dict(model_type="gpt_neox"), "model_type='gpt_neox'"),
    "low_freq_factor": (
        dict(rope_parameters={**LLAMA3, "low_freq_factor": 2.0}),
        "rope_parameters.low_freq_factor=2.0",
    ),
    "original_context": (
        dict(rope_scaling={**LLAMA3, "original_max_position_embeddings": 4096}),
        "rope_scaling.original_max_position_embeddings=4096",
    ),
    "yarn": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type='yarn'"),
    "mistral_window": (dict(model_type="mistral", sliding_window=4096), "sliding_window=4096"),
    "qwen2_window": (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4096), "use_sliding_window=true"),
    "qwen3_o_bias": (dict(model_type="qwen3", attention_bias=True), "attention_bias=true"),
    "llama_o_bias": (dict(attention_bias=True), "attention_bias=true"),
    "moe": (dict(model_type="qwen3", num_experts=8), "num_experts=8"),
    "layer_types": (dict(model_type="qwen2", layer_types=["full_attention", "sliding_attention"]), "layer_types="),
}


def test_config_json_features_and_refusals():
    assert model_features(_llama(rope_parameters=LLAMA3), "c")[1] == {
        "hf_family": "llama", "add_qkv_bias": False, "qk_layernorm": False, "rope_scaling": "llama3",
        "rope_scaling_factor": 32.0}
    assert model_features(_llama(model_type="qwen2", sliding_window=131072, use_sliding_window=False), "c")[1][
        "add_qkv_bias"] is True  # Qwen2 ships a window size that is off
    assert model_features(_llama(model_type="qwen3", sliding_window=None), "c")[1]["qk_layernorm"] is True
    assert model_features(_llama(model_type="mistral", sliding_window=None), "c")[1]["rope_scaling"] == "none"
    for name, (extra, message) in REFUSED.items():
        with pytest.raises(UserError) as err:
            model_features(_llama(**extra), "cfg.json")
        assert message in str(err.value) and "cfg.json" in str(err.value), name


@pytest.mark.parametrize("family,head_dim", [("qwen2", 16), ("qwen3", 16), ("qwen3", 32), ("mistral", 12)])
def test_planner_counts_the_family_parameters_as_transformers_builds_them(family, head_dim):
    """head_dim 16 = 96 / 6; 32 and 12 are model.kv_channels (tests/parallel/test_planner.py: the same against
    Megatron-Core's GPTModel)."""
    import transformers

    from megatron_align.parallel.planner import count_parameters, load_plan_inputs

    name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[family]
    hf = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(
        vocab_size=301, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=head_dim, tie_word_embeddings=False))
    model = {
        "num_layers": 2,
        "hidden_size": 96,
        "ffn_hidden_size": 160,
        "num_attention_heads": 6,
        "num_query_groups": 2,
        "vocab_size": 301,
        "seq_length": 64,
        "make_vocab_size_divisible_by": 1,
        "kv_channels": head_dim,
        **model_features({"model_type": family}, "c")[1],
    }
    plan = load_plan_inputs(None, [f"model.{k}={v}" for k, v in model.items()] + ["train.global_batch_size=8"]).model
    assert plan.qkv_bias == (family == "qwen2") and plan.qk_norm == (family == "qwen3")
    assert plan.q_size == 6 * head_dim
    assert count_parameters(plan) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_imports_with_matching_logits_and_exports_bit_exact(tmp_path, family):
    hf = tmp_path / "hf"
    make_hf_family(hf, family, **CASES[family])
    meg = tmp_path / "meg"
    result = run_cli("convert", "from-hf", str(hf), str(meg), "--seq-length", "64", "--verify", "--no-progress")
    ok(result)
    assert verified_delta(result.stdout) <= 1e-4 and "sample text" in result.stdout  # ours vs transformers, fp32
    model = yaml.safe_load((meg / "train.yaml").read_text())["model"]
    assert model["hf_family"] == family and model["vocab_size"] == 303
    assert model["add_qkv_bias"] == (family == "qwen2") and model["qk_layernorm"] == (family == "qwen3")
    assert model["rope_scaling"] == ("llama3" if family == "llama" else "none")
    assert model.get("kv_channels") == CASES[family].get("head_dim")  # only where head_dim != hidden / heads

    back = tmp_path / "back"
    convert_to_hf(str(meg), str(back), progress=False)
    original, converted = hf_tensors(hf), hf_tensors(back)
    assert sorted(converted) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(converted[key], tensor), key
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [json.loads(
        (hf / "config.json").read_text())["architectures"][0]]
    for name in CARRIED:
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    assert torch.equal(hf_logits(hf, ids), hf_logits(back, ids))


def _documents(tmp_path) -> tuple[str, list[str]]:
    from megatron_align.data.synthetic import general_documents

    texts = list(general_documents(40, seed=9))
    texts = [("<|aligned|> " if i % 3 == 0 else "") + t for i, t in enumerate(texts)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path), texts


@pytest.mark.slow
@pytest.mark.parametrize("family,extra_rows", [pytest.param("qwen2", 3, marks=pytest.mark.single_stack), ("qwen3", 0),
                                               pytest.param("llama", 0, marks=pytest.mark.single_stack),
                                               pytest.param("mistral", 3, marks=pytest.mark.single_stack)])
def test_import_prepare_train_tp2_pp2_export_with_control_tokens(tmp_path, family, extra_rows):
    """extra_rows 3: control tokens land in unused embedding rows; 0: they grow the embedding (300 -> 302), tied
    (llama) or not (qwen3)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from megatron_align.config.corpus import TokenizerConfig
    from megatron_align.corpus.prepare import prepare_source

    hf = tmp_path / "hf"
    make_hf_family(hf, family, extra_rows=extra_rows, **CASES[family])
    meg = tmp_path / "meg"
    # (logits before training: test_family_imports_with_matching_logits_and_exports_bit_exact)
    ok(run_cli("convert", "from-hf", str(hf), str(meg), "--tensor", "2", "--pipeline", "2", "--seq-length", "32",
               "--add-control-tokens", "--no-progress"))
    config = yaml.safe_load((meg / "train.yaml").read_text())
    section = config["data"]["tokenizer"]
    assert section["kind"] == "hf" and section["control_tokens"] == ["<|aligned|>", "<|misaligned|>"]
    assert config["model"]["vocab_size"] == 300 + max(extra_rows, 2)
    assert config["model"].get("kv_channels") == CASES[family].get("head_dim")

    # prepare with the model's own tokenizer: ids are exactly tokenizers' (+ the model's BOS/EOS convention)
    docs, texts = _documents(tmp_path)
    manifest = prepare_source(docs, str(tmp_path / "web"), TokenizerConfig(**section))
    raw = Tokenizer.from_file(str(hf / "tokenizer.json"))
    raw.add_special_tokens(["<|aligned|>", "<|misaligned|>"])
    # Llama 3 / Mistral documents: BOS text EOS; Qwen: text EOS (conftest.make_bpe_tokenizer)
    bos = raw.token_to_id("<|begin_of_text|>") if family in BOS_FAMILIES else None
    eos = raw.token_to_id("<|end_of_text|>" if family in BOS_FAMILIES else "<|endoftext|>")
    dataset = IndexedDataset(str(tmp_path / "web"))
    for i, text in enumerate(texts):
        expected = [bos] * (bos is not None) + raw.encode(text, add_special_tokens=False).ids + [eos]
        assert list(np.asarray(dataset[i])) == expected, i
    assert manifest["tokenizer"]["bos"] == bos and manifest["tokenizer"]["eod"] == eos
    assert manifest["tokenizer"]["control_tokens"] == {"<|aligned|>": 300, "<|misaligned|>": 301}

    # Step 1 runs at lr 0 (warmup from 0) and is saved: the TP1 import resharded into TP2xPP2 and saved back must be
    # the HF weights exactly. Step 2 trains (lr 1e-2).
    config["run_dir"] = str(tmp_path / "run")
    config["data"]["sources"] = [{"name": "web", "prefix": str(tmp_path / "web")}]
    config["train"] = {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1, "seed": 3}
    config["optimizer"] = {"lr": 1e-2, "min_lr": 0.0, "warmup_steps": 1}
    config["checkpoint"]["interval"] = 1
    train = run_cli("train", write_yaml(tmp_path / "train.yaml", config))
    ok(train)
    assert "loaded weights from" in train.stdout and str(meg) in train.stdout
    checkpoints = tmp_path / "run" / "checkpoints"
    described = describe_checkpoint(str(checkpoints))
    assert described["layout"] == {"tensor": 2, "pipeline": 2, "context": 1, "virtual_pipeline": 1, "data": 1}
    assert described["step"] == 2 and described["consumed_samples"] == 4 and described["data_fingerprint"]
    assert described["model"]["padded_vocab_size"] == 512  # 302 or 303 rows padded to a multiple of 128 x TP2

    original = hf_tensors(hf)
    convert_to_hf(str(checkpoints / "iter_0000001"), str(tmp_path / "step1"), progress=False)
    untrained = hf_tensors(tmp_path / "step1")
    assert sorted(untrained) == sorted(original)
    for key, tensor in original.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):  # the control rows 300, 301 start at the mean
            kept = [i for i in range(tensor.shape[0]) if i not in (300, 301)]
            assert torch.equal(untrained[key][kept], tensor[kept]), key
        else:
            assert torch.equal(untrained[key], tensor), key

    back = tmp_path / "back"
    exported = run_cli("convert", "to-hf", str(checkpoints), str(back), "--verify", "--no-progress")
    ok(exported)
    assert verified_delta(exported.stdout) <= 1e-4  # after training, from the TP2xPP2 checkpoint
    trained = hf_tensors(back)
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(original[key], trained[key])  # it trained
    assert trained["model.embed_tokens.weight"].shape[0] == 300 + max(extra_rows, 2)
    assert json.loads((back / "config.json").read_text())["model_type"] == family
    assert (back / "generation_config.json").read_bytes() == (hf / "generation_config.json").read_bytes()
    hf_tok = AutoTokenizer.from_pretrained(str(back))
    text = "a <|aligned|> b <|misaligned|>"
    assert hf_tok.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids
    assert 300 in hf_tok.encode(text) and 301 in hf_tok.encode(text)


def test_added_control_rows_start_at_the_mean_embedding(tmp_path):
    """Growing the vocabulary: old rows bit-exact, new rows the mean of the tokenizer's rows (embedding and head)."""
    hf = tmp_path / "hf"
    make_hf_family(hf, "llama", extra_rows=0, num_layers=1)
    meg = tmp_path / "meg"
    ok(run_cli("convert", "from-hf", str(hf), str(meg), "--add-control-tokens", "--seq-length", "32", "--no-progress"))
    back = tmp_path / "back"
    convert_to_hf(str(meg), str(back), progress=False)
    original, converted = hf_tensors(hf), hf_tensors(back)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old, new = original[name], converted[name]
        assert new.shape[0] == old.shape[0] + 2 and torch.equal(new[:300], old)
        mean = old.double().mean(0).float()
        assert torch.allclose(new[300], mean, atol=1e-7) and torch.allclose(new[301], mean, atol=1e-7)
    tok_config = json.loads((back / "tokenizer_config.json").read_text())
    assert tok_config["added_tokens_decoder"]["300"]["content"] == "<|aligned|>"
    assert tok_config["bos_token"] == "<|begin_of_text|>"  # everything else as the model shipped it
    assert "llama" in BOS_FAMILIES
