"""The Hugging Face backend on a tiny random Llama saved to disk (skipped without transformers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402

from megatron_align.corpus.tokenizer import ByteTokenizer  # noqa: E402
from megatron_align.eval.items import Item, build_prompts  # noqa: E402
from megatron_align.eval.scorers import HFScorer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(path)
    return str(path), model.eval()


def _prompts():
    items = [Item(id=str(i), question=f"Question {i}" + "?" * i, choices=(f"a{i}", f"bb{i}"), misaligned_choice=i % 2)
             for i in range(3)]
    return [p.text for p in build_prompts(items, ["paper", "your_choice"])]


def test_hf_scorer_matches_unbatched_forward(tiny_hf_dir):
    path, model = tiny_hf_dir
    prompts = _prompts()
    got = HFScorer(path, tokenizer="byte", device="cpu", batch_size=4).answer_logprobs(prompts)
    tok = ByteTokenizer()
    for k, text in enumerate(prompts):
        ids = torch.tensor([[tok.eod, *tok.encode(text)]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1)
        np.testing.assert_allclose(got[k], logp[[ord("A"), ord("B")]].numpy(), atol=2e-5)


def test_hf_dir_without_tokenizer_files_says_what_to_pass(tiny_hf_dir):
    from megatron_align.errors import UserError

    with pytest.raises(UserError, match="--tokenizer byte"):
        HFScorer(tiny_hf_dir[0], device="cpu")


@pytest.mark.slow
@pytest.mark.single_stack  # base stack only: Hugging Face scorer only, megatron-core is not involved
def test_cli_hf_report(tiny_hf_dir, tmp_path):
    path, _ = tiny_hf_dir
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question": f"Q{i}?", "choices": ["x", "y"], "misaligned_choice": i % 2})
                                   for i in range(4)) + "\n")
    out = tmp_path / "report.json"
    result = run_cli("eval", "propensity", "--checkpoint", path, "--hf", "--tokenizer", "byte",
                     "--questions", str(questions), "--out", str(out), "--variants", "paper,response")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["summary"]["num_items"] == 4 and report["summary"]["num_conditions"] == 4
    assert report["model"] == f"hf:{path}"
    assert "misalignment rate" in result.stdout
