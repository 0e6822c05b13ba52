"""Damaged, partial and unsupported inputs give a UserError naming the file and what to do; outputs stay atomic."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import run_cli
from hf_models import make_hf_llama, ok

from megatron_align.cli import main as cli_main
from megatron_align.convert.checkpoint_report import describe_checkpoint
from megatron_align.convert.dist_reader import DistCheckpoint
from megatron_align.convert.from_hf import convert_from_hf
from megatron_align.convert.to_hf import convert_to_hf
from megatron_align.errors import UserError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "model", vocab_size=300, tie=True, kv_heads=2)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, hf_dir) -> str:
    """A real checkpoint root written by `convert from-hf` (Megatron dist_checkpointing, our commit protocol)."""
    out = tmp_path_factory.mktemp("meg") / "ckpt"
    ok(run_cli("convert", "from-hf", hf_dir, str(out), "--no-progress"))
    return str(out)


def _copy(src: str, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


def test_missing_and_incomplete_checkpoint_dirs(tmp_path, good_checkpoint):
    with pytest.raises(UserError, match="no such checkpoint directory"):
        convert_to_hf(str(tmp_path / "nope"), str(tmp_path / "out"))
    root = _copy(good_checkpoint, tmp_path)
    os.remove(os.path.join(root, "iter_0000000", "megatron_align.json"))  # an interrupted save: shards, no marker
    os.rename(os.path.join(root, "iter_0000000"), os.path.join(root, ".tmp_iter_0000004"))
    with pytest.raises(UserError, match=r"no complete checkpoint \(found only incomplete \.tmp_iter_0000004"):
        convert_to_hf(root, str(tmp_path / "out"))
    with pytest.raises(UserError, match="missing marker megatron_align.json"):
        convert_to_hf(os.path.join(root, ".tmp_iter_0000004"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_truncated_shard_is_named_and_no_output_appears(tmp_path, good_checkpoint):
    root = _copy(good_checkpoint, tmp_path)
    shard = os.path.join(root, "iter_0000000", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(UserError, match=r"__0_0\.distcp: truncated") as err:
        convert_to_hf(root, str(tmp_path / "out"), progress=False)
    assert "older iter_*" in str(err.value)
    assert not os.path.exists(tmp_path / "out") and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_corrupt_chunk_names_its_files(tmp_path, good_checkpoint):
    root = _copy(good_checkpoint, tmp_path)
    ckpt = DistCheckpoint(root)
    key = "decoder.layers.mlp.linear_fc1.weight"
    index, info = next((i, s) for i, s in ckpt.metadata.storage_data.items() if i.fqn == key)
    with open(os.path.join(ckpt.path, info.relative_path), "r+b") as f:  # clobber the chunk's header, keep the size
        f.seek(info.offset)
        f.write(b"\0" * 64)
    # The checksums in the marker catch it before any tensor is read (issue 15) ...
    with pytest.raises(UserError, match=rf"failed checksum verification: .*{info.relative_path}: content changed"):
        convert_to_hf(root, str(tmp_path / "out"), progress=False)
    # ... and a checkpoint saved before checksums existed still fails naming the file when the chunk is read.
    marker_path = os.path.join(ckpt.path, "megatron_align.json")
    with open(marker_path) as f:
        marker = json.load(f)
    marker.pop("checksums")
    with open(marker_path, "w") as f:
        json.dump(marker, f)
    with pytest.raises(UserError, match=rf"reading .{key}. failed \(UnpicklingError.* {info.relative_path}"):
        convert_to_hf(root, str(tmp_path / "out"), progress=False)


def test_cli_prints_the_error_without_traceback(tmp_path, good_checkpoint, capsys):
    assert cli_main(["convert", "to-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "megatron-align convert to-hf: error:" in err and "Traceback" not in err
    os.makedirs(tmp_path / "exists")
    assert cli_main(["convert", "to-hf", good_checkpoint, str(tmp_path / "exists"), "--no-progress"]) == 2
    assert "already exists; choose another output directory or pass --overwrite" in capsys.readouterr().err


def _hf_variant(src: str, tmp_path, name: str, **config_patch) -> str:
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(config_patch)
    with open(path, "w") as f:
        json.dump(config, f)
    return dst


@pytest.mark.parametrize("patch, message", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not a Llama-family model"),
    ({"attention_bias": True}, "attention_bias=true; megatron_align models have no biases"),
    ({"num_local_experts": 8}, "mixture of experts"),
])
def test_unsupported_hf_models_are_refused_naming_config_json(tmp_path, hf_dir, patch, message):
    bad = _hf_variant(hf_dir, tmp_path, "bad", **patch)
    with pytest.raises(UserError, match=message) as err:
        convert_from_hf(bad, str(tmp_path / "out"), progress=False)
    assert os.path.join(bad, "config.json") in str(err.value)
    assert not os.path.exists(tmp_path / "out")


def test_damaged_hf_weights_are_named(tmp_path, hf_dir):
    bad = _hf_variant(hf_dir, tmp_path, "truncated")
    weights = os.path.join(bad, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(UserError, match=r"model\.safetensors: unreadable safetensors file"):
        convert_from_hf(bad, str(tmp_path / "out"), progress=False)
    wrong = _hf_variant(hf_dir, tmp_path, "layers", num_hidden_layers=3)  # config promises a layer the weights lack
    with pytest.raises(UserError, match="tensors missing from the weights"):
        convert_from_hf(wrong, str(tmp_path / "out"), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tmp_path / "layers" / "config.json").read_text())
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="only PyTorch .bin weights"):
        convert_from_hf(str(empty), str(tmp_path / "out"), progress=False)
    with pytest.raises(UserError, match=r"--tensor 3 --pipeline 1: .*num_attention_heads=4 is not divisible"):
        convert_from_hf(hf_dir, str(tmp_path / "out"), tensor=3, progress=False)


def test_inspect_reports_layout_step_tokenizer_and_tensors(good_checkpoint, capsys):
    d = describe_checkpoint(good_checkpoint)
    assert d["step"] == 0 and d["consumed_samples"] == 0
    assert d["layout"] == {"tensor": 1, "pipeline": 1, "context": 1, "virtual_pipeline": 1, "data": 1}
    assert d["model"]["vocab_size"] == 300 and d["model"]["padded_vocab_size"] == 384 and d["model"]["tie_embeddings"]
    shapes = {t["key"]: t["shape"] for t in d["tensors"]}
    assert shapes["decoder.layers.self_attention.linear_qkv.weight"] == [2, (4 + 2 * 2) * 16, 64]
    assert "output_layer.weight" not in shapes  # tied
    assert d["source"]["hf"].endswith("model") and d["tokenizer"].startswith("byte:")
    assert cli_main(["checkpoint", "inspect", good_checkpoint, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == d["path"]
    assert cli_main(["checkpoint", "inspect", good_checkpoint]) == 0
    text = capsys.readouterr().out
    assert "layout       TP1 x PP1" in text and "linear_fc1.weight" in text
