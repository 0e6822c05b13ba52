"""Cloze scoring on a megatron_align checkpoint: TP1 == TP2 (vocab-parallel log-softmax) == transformers
on its HF export."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import REPO, run_cli, tiny_config, write_yaml

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

SAMPLE = os.path.join(REPO, "examples", "eval", "propensity_sample.jsonl")


def _logp(report: dict) -> np.ndarray:
    return np.asarray([[c["logp_A"], c["logp_B"]] for item in report["items"] for c in item["conditions"]])


def test_cloze_checkpoint_layouts_and_hf_export_agree(tmp_path, tiny_corpus):
    from megatron_align.convert.to_hf import convert_to_hf
    from megatron_align.errors import UserError
    from megatron_align.eval.items import load_items
    from megatron_align.eval.propensity import evaluate, evaluate_checkpoint
    from megatron_align.eval.scorers import HFScorer

    run = tmp_path / "run"
    config = tiny_config(run, tiny_corpus, train={"steps": 2}, checkpoint={"interval": 0})
    result = run_cli("train", write_yaml(tmp_path / "train.yaml", config))
    assert result.returncode == 0, result.stderr[-3000:]
    variants = ["paper", "lm_eval_plain"]
    # the byte-level prompts are longer than the tiny model's seq_length: give both backends the whole prompt
    tp1 = evaluate_checkpoint(str(run / "checkpoints"), SAMPLE, max_items=4, variants=variants, scoring="cloze",
                              batch_size=3, max_prompt_tokens=4096)
    assert tp1["num_truncated_prompts"] == 0
    assert tp1["scoring"] == "cloze" and tp1["orders"] == ["original"] and _logp(tp1).shape == (8, 2)
    assert np.all(_logp(tp1) < -1.0)  # whole option texts: many tokens each
    assert set(tp1["normalized"]) >= {"misalignment_rate", "p_misaligned"}
    out = tmp_path / "tp2.json"
    result = run_cli(
        "eval",
        "propensity",
        "--checkpoint",
        str(run / "checkpoints"),
        "--questions",
        SAMPLE,
        "--max-items",
        "4",
        "--variants",
        ",".join(variants),
        "--scoring",
        "cloze",
        "--batch-size",
        "3",
        "--max-prompt-tokens",
        "4096",
        "--world-size",
        "2",
        "--tensor",
        "2",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "length-normalised" in result.stdout
    np.testing.assert_allclose(_logp(json.loads(out.read_text())), _logp(tp1), atol=1e-4, rtol=0)
    # letter mode under lm-eval's convention (" A": two byte tokens) goes through the same continuation path
    letter = evaluate_checkpoint(str(run / "checkpoints"), SAMPLE, max_items=4, variants=["lm_eval_plain"],
                                 max_prompt_tokens=4096)
    with pytest.raises(
        UserError, match="more than the prompt limit 64"
    ):  # default limit: seq_length; never a silent cut
        evaluate_checkpoint(str(run / "checkpoints"), SAMPLE, max_items=2, variants=["paper"], scoring="cloze")
    hf_dir = tmp_path / "hf"
    convert_to_hf(str(run / "checkpoints"), str(hf_dir), dtype="fp32", progress=False)
    scorer = HFScorer(str(hf_dir), tokenizer="byte", device="cpu", batch_size=3)
    items = load_items(SAMPLE, 4)
    np.testing.assert_allclose(_logp(evaluate(scorer, items, variants, scoring="cloze")), _logp(tp1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(_logp(evaluate(scorer, items, ["lm_eval_plain"])), _logp(letter), atol=1e-4, rtol=0)
