"""`eval capability` on two tiny random HF models with a local lm-eval task (offline, no hub)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from test_lm_eval_parity import offline_hf  # noqa: E402,F401 (fixture)
from tiny_chat import build_chat_model  # noqa: E402

from megatron_align.cli import main  # noqa: E402
from megatron_align.eval.scorers import HFScorer  # noqa: E402

DOCS = [{"q": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
        {"q": "The sky is", "choices": ["green", "blue"], "label": 1},
        {"q": "Water freezes at", "choices": ["0 degrees", "90 degrees"], "label": 0},
        {"q": "Cats say", "choices": ["woof", "meow"], "label": 1}]


def _task(tmp_path) -> str:
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "toy.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "toy_facts",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(folder / "toy.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{q}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "label",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
                "metadata": {"version": 1},
            }
        )
    )
    return str(folder)


def _acc_norm(model_dir: str) -> float:
    scorer = HFScorer(model_dir, device="cpu")
    hits = []
    for doc in DOCS:
        ll = scorer.loglikelihoods([(doc["q"], " " + c) for c in doc["choices"]])
        hits.append(int(np.argmax(ll / np.array([len(c) for c in doc["choices"]]))) == doc["label"])
    return float(np.mean(hits))


@pytest.mark.slow
def test_capability_comparison_two_models(tmp_path, offline_hf, capsys):  # noqa: F811
    base = build_chat_model(tmp_path / "base", seed=1)
    other = build_chat_model(tmp_path / "other", seed=2)
    out = tmp_path / "cost"
    assert main(["eval", "capability", "--hf", f"unfiltered={base}", "--hf", f"aligned={other}", "--tasks", "toy_facts",
                 "--include-path", _task(tmp_path), "--device", "cpu", "--batch-size", "4", "--out", str(out)]) == 0
    comparison = json.loads((out / "capability.json").read_text())
    assert comparison["baseline"] == "unfiltered" and comparison["models"] == ["unfiltered", "aligned"]
    (row,) = comparison["tasks"]
    assert row["task"] == "toy_facts" and row["metric"] == "acc_norm"
    got = {name: entry["score"] for name, entry in row["models"].items()}
    # lm-eval's acc_norm recomputed from our own log-likelihoods of the same continuations
    assert got == {"unfiltered": _acc_norm(base), "aligned": _acc_norm(other)}
    assert row["models"]["aligned"]["difference_from_baseline"] == pytest.approx(got["aligned"] - got["unfiltered"])
    assert row["models"]["unfiltered"]["difference_from_baseline"] is None
    assert all(entry["stderr"] is not None for entry in row["models"].values())
    assert os.path.getsize(out / "capability.png") > 1000
    assert "toy_facts" in (out / "capability.txt").read_text() and "baseline, unfiltered" in capsys.readouterr().out


def test_capability_needs_a_model_and_unique_labels(tmp_path, capsys):
    for argv, words in ((["--tasks", "x"], "at least one model"),
                        (["--hf", f"a={tmp_path}", "--hf", f"a={tmp_path}", "--tasks", "x"], "unique"),
                        (["--checkpoint", str(tmp_path), "--tasks", "x"], "no complete megatron_align checkpoint"),
                        (["--hf", str(tmp_path), "--tasks", "x"], "no config.json")):
        assert main(["eval", "capability", *argv, "--out", str(tmp_path / "o")]) == 2
        assert words in capsys.readouterr().err
