"""Checkpoints written by real `megatron-align train` runs convert to HF with matching logits (TP1xPP1 and TP2xPP2).

Two training runs in all: a fresh TP1xPP1 run (tied embeddings, GQA), and a TP2xPP2 run that starts from a
`convert from-hf` checkpoint (untied, odd vocabulary) — which also proves that the TP1 save of from-hf
reshards into TP2xPP2 on load.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import run_cli, tiny_config, write_yaml
from hf_models import hf_tensors, make_hf_llama, ok, verified_delta
from megatron_align.convert.inspect import describe_checkpoint
from megatron_align.data.tokenizer import ByteTokenizer

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")


def test_tp1_trained_checkpoint_converts_and_loads_in_transformers(tmp_path, tiny_corpus):
    cfg = write_yaml(tmp_path / "tp1.yaml", tiny_config(tmp_path / "run", tiny_corpus, train={"steps": 2},
                                                         checkpoint={"interval": 0}))
    ok(run_cli("train", cfg))
    result = run_cli("convert", "to-hf", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "hf"), "--verify",
                     "--no-progress")
    ok(result)
    assert "from " in result.stdout and "(step 2)" in result.stdout
    assert verified_delta(result.stdout) <= 1e-4  # our GPTModel loaded from the TP1 checkpoint vs transformers

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    hf_tok, ours = AutoTokenizer.from_pretrained(str(tmp_path / "hf")), ByteTokenizer()
    text = "The model converts <|aligned|> and loads."
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert ids == ours.encode(text)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert torch.isfinite(loss) and loss < 7.0  # near ln(512) after 2 steps; garbage weights give far more
    source = json.loads((tmp_path / "hf" / "megatron_align_source.json").read_text())
    assert source["step"] == 2 and source["layout"]["tensor"] == 1


def test_from_hf_loads_under_tp2_pp2_and_the_tp2_pp2_checkpoint_converts_back(tmp_path, tiny_corpus):
    hf = make_hf_llama(tmp_path / "hf", vocab_size=515, tie=False, kv_heads=2)
    meg = tmp_path / "meg"
    ok(run_cli("convert", "from-hf", hf, str(meg), "--tensor", "2", "--pipeline", "2", "--seq-length", "64",
               "--no-progress"))
    config = yaml.safe_load((meg / "train.yaml").read_text())
    config["run_dir"] = str(tmp_path / "run")
    config["data"]["sources"] = [{"name": "web", "prefix": tiny_corpus}]
    # One step at a negligible learning rate: the saved TP2xPP2 weights must still equal the HF weights.
    config["train"] = {"steps": 1, "global_batch_size": 4, "micro_batch_size": 1, "seed": 7}
    config["optimizer"] = {"lr": 1e-9, "min_lr": 0.0, "warmup_steps": 0, "weight_decay": 0.0}
    train = run_cli("train", write_yaml(tmp_path / "train.yaml", config))
    ok(train)
    assert "loaded weights from" in train.stdout and str(meg) in train.stdout

    described = describe_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert described["layout"] == {"tensor": 2, "pipeline": 2, "context": 1, "virtual_pipeline": 1, "data": 1}
    assert described["step"] == 1 and described["consumed_samples"] == 4 and described["data_fingerprint"]
    assert described["model"]["padded_vocab_size"] == 768  # 515 padded to a multiple of 128 x TP2

    back = tmp_path / "back"
    result = run_cli("convert", "to-hf", str(tmp_path / "run" / "checkpoints"), str(back), "--verify", "--no-progress")
    ok(result)
    assert verified_delta(result.stdout) <= 1e-4  # our GPTModel loaded from the TP2xPP2 checkpoint vs transformers
    original, converted = hf_tensors(tmp_path / "hf"), hf_tensors(back)
    assert sorted(converted) == sorted(original)
    for key, tensor in original.items():
        assert torch.allclose(converted[key], tensor, rtol=0, atol=1e-6), key
    assert json.loads((back / "config.json").read_text())["vocab_size"] == 515
