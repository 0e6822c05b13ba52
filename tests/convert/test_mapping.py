"""Unit tests of the conversion pieces that need no Megatron process group (fast, in-process)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_align.convert import mapping
from megatron_align.convert.hf_io import ShardedSafetensorsWriter, parse_llama_config, parse_size
from megatron_align.convert.mapping import LlamaDims
from megatron_align.convert.tokenizer_export import SAMPLE_TEXTS, write_byte_tokenizer
from megatron_align.corpus.tokenizer import ByteTokenizer
from megatron_align.errors import UserError

DIMS = LlamaDims(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=8, num_query_groups=2,
                 vocab_size=101, tie_embeddings=False)


def test_grouped_qkv_rows_are_q_heads_then_k_then_v_per_group():
    d, h = DIMS.head_dim, DIMS.hidden_size
    # Label every row with (group, slot) so the layout is visible: slot < 4 = query head, 4 = key, 5 = value.
    rows = [torch.full((d, h), 100.0 * g + slot) for g in range(2) for slot in range(6)]
    q, k, v = mapping.split_qkv(torch.cat(rows), DIMS)
    assert q.shape == (8 * d, h) and k.shape == (2 * d, h) and v.shape == (2 * d, h)
    assert [int(q[i * d, 0]) for i in range(8)] == [0, 1, 2, 3, 100, 101, 102, 103]
    assert [int(k[i * d, 0]) for i in range(2)] == [4, 104]
    assert [int(v[i * d, 0]) for i in range(2)] == [5, 105]
    assert torch.equal(mapping.merge_qkv(q, k, v, DIMS), torch.cat(rows))


def test_fc1_is_gate_then_up_and_layer_mapping_round_trips():
    hf = {name: torch.randn(shape) for name, shape in mapping.hf_shapes(DIMS).items()}
    for layer in range(DIMS.num_layers):
        for name in mapping.LAYER_KEYS:
            key = mapping.layer_key(name)
            meg = mapping.megatron_tensor_from_hf(key, layer, hf.__getitem__, DIMS)
            back = dict(mapping.layer_to_hf(key, meg, layer, DIMS))
            assert back and all(torch.equal(t, hf[n]) for n, t in back.items()), key
    fc1 = mapping.megatron_tensor_from_hf(mapping.layer_key(mapping.FC1), 0, hf.__getitem__, DIMS)
    assert torch.equal(fc1[:48], hf["model.layers.0.mlp.gate_proj.weight"])


def test_vocab_padding_is_zero_filled_and_trimmed():
    hf = {"model.embed_tokens.weight": torch.randn(101, 32), "lm_head.weight": torch.randn(101, 32)}
    padded = mapping.megatron_tensor_from_hf(mapping.OUTPUT, None, hf.__getitem__, DIMS, padded_rows=128)
    assert padded.shape == (128, 32) and padded[101:].abs().sum() == 0
    ((name, trimmed),) = mapping.global_to_hf(mapping.OUTPUT, padded, DIMS)
    assert name == "lm_head.weight" and torch.equal(trimmed, hf["lm_head.weight"])
    tied = LlamaDims(**{**DIMS.__dict__, "tie_embeddings": True})
    assert mapping.global_to_hf(mapping.OUTPUT, padded, tied) == []
    assert "lm_head.weight" not in mapping.hf_names(tied)


def test_state_dict_names_map_to_checkpoint_keys():
    assert mapping.checkpoint_key_of_state_dict_name("decoder.layers.3.input_layernorm.weight") == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3)
    assert mapping.checkpoint_key_of_state_dict_name("decoder.layers.0.pre_mlp_layernorm.weight") == (
        "decoder.layers.mlp.linear_fc1.layer_norm_weight", 0)
    assert mapping.checkpoint_key_of_state_dict_name("decoder.layers.1.mlp.linear_fc1._extra_state") is None
    with pytest.raises(UserError, match="no Llama equivalent"):
        mapping.layer_to_hf("decoder.layers.self_attention.linear_qkv.bias", torch.zeros(4), 0, DIMS)


def test_streamed_safetensors_shards_load_with_safetensors_and_index(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(10, 10),
        "b": torch.randn(3).to(torch.bfloat16),
        "c": torch.randn(20, 5),
        "d": torch.randn(7),
    }
    specs = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(str(tmp_path), specs, max_shard_bytes=450)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    # a (400 B) + b (6 B) fill shard 1; c (400 B) would exceed 450 B, so c + d go to shard 2
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                                   "c": "model-00002-of-00002.safetensors", "d": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / f)))
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in tensors.items())
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("123") == 123


@pytest.mark.parametrize("patch, message", [
    ({"model_type": "gpt2"}, "not a Llama-family"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"num_local_experts": 8}, "mixture of experts"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope_type='yarn' is not supported"),
    ({"head_dim": 7}, "head_dim=7"),
    ({"head_dim": 0}, "head_dim=0"),
    ({"head_dim": "16"}, "head_dim='16'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_hf_configs_are_named(patch, message):
    config = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 64, "vocab_size": 100, "num_key_value_heads": 2}
    assert parse_llama_config(config, "x/config.json").dims.num_query_groups == 2
    with pytest.raises(UserError, match=message) as err:
        parse_llama_config({**config, **patch}, "x/config.json")
    assert "x/config.json" in str(err.value)


def test_hf_head_dim_becomes_kv_channels_only_where_it_is_not_hidden_over_heads():
    config = {"model_type": "qwen3", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 64, "vocab_size": 100, "num_key_value_heads": 2}
    assert parse_llama_config({**config, "head_dim": 8}, "c").dims.kv_channels is None  # 32 / 4: the default
    dims = parse_llama_config({**config, "head_dim": 16}, "c").dims  # Qwen3-0.6B-like: 4 x 16 != 32
    assert dims.kv_channels == dims.head_dim == 16 and dims.q_size == 64 and dims.kv_size == 32
    assert mapping.hf_shapes(dims)["model.layers.0.self_attn.o_proj.weight"] == (32, 64)
    assert mapping.hf_shapes(dims)["model.layers.0.self_attn.q_norm.weight"] == (16,)


def test_byte_tokenizer_export_encodes_exactly_like_ours(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = ByteTokenizer()
    assert write_byte_tokenizer(str(tmp_path), ours, 64)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == ours.vocab_size and hf.eos_token_id == ours.eod and hf.pad_token_id == ours.pad
    for text in SAMPLE_TEXTS + ["  leading spaces", ""]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), text
        assert hf.decode(ids + [ours.eod], skip_special_tokens=True) == ours.decode(ids + [ours.eod])
    assert hf.convert_tokens_to_ids("<|aligned|>") == ours.control_token_ids["<|aligned|>"]
    assert os.path.isfile(tmp_path / "tokenizer_config.json")
