"""A checkpoint written by a real `megatron-align train` run converts to HF with matching logits (TP1xPP1).

A fresh TP1xPP1 run (tied embeddings, GQA, the byte tokenizer). TP2xPP2 runs that start from a `convert from-hf`
checkpoint, and prove that its TP1 save reshards into TP2xPP2 on load bit-exactly, are one per family in
tests/convert/test_families.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, tiny_config, write_yaml
from hf_models import ok, verified_delta

from megatron_align.corpus.tokenizer import ByteTokenizer

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
