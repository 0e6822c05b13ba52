"""synth generate end to end against a real OpenAI-compatible server on CPU: ``transformers serve`` with a tiny random
chat model. The model samples uniformly (zeroed output layer, ``do_sample``) and stops on any of a few tokens, so
some documents end with ``stop`` and some are cut at ``max_tokens`` (``length``); every count of the report must
agree with the generations the server returned."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import yaml
from conftest import http_server, run_cli
from test_synth_generate import NUM_ITEMS, stub_taxonomy

from megatron_align.parallel.spawn import free_port

EVAL_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "eval")
MAX_TOKENS = 16
# One interpreter builds the model and serves it (a second import of transformers costs ~5 s of CPU). The model's
# next token is uniform over its ~260 tokens (zeroed output layer, sampling) and 11 of them end a reply, so about
# half the replies stop before MAX_TOKENS and half are cut there.
SERVE = f"""
import sys
sys.path.insert(0, {EVAL_TESTS!r})
import transformers
from tiny_chat import build_chat_model
model = build_chat_model(sys.argv[1], always="B")
config = transformers.GenerationConfig.from_pretrained(model)
config.do_sample, config.eos_token_id = True, [config.eos_token_id, *range(1, 11)]
config.save_pretrained(model)
from transformers.cli.transformers import app
app(["serve", model, "--device", "cpu", "--host", "127.0.0.1", "--port", sys.argv[2], "--log-level", "warning"])
"""


def _serve_available() -> bool:
    """transformers' own is_serve_available(), without importing transformers at collection time."""
    return all(importlib.util.find_spec(name) for name in ("transformers", "fastapi", "uvicorn", "openai", "pydantic"))


@pytest.mark.slow
@pytest.mark.single_stack  # no megatron-core in the path: the client is the standard library
@pytest.mark.skipif(not _serve_available(), reason="needs transformers[serving] (fastapi, uvicorn, openai)")
def test_generate_against_transformers_serve_on_cpu(tmp_path):
    model, port = str(tmp_path / "tiny"), free_port()
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    raw = yaml.safe_load(open(stub_taxonomy(tmp_path)))
    raw["generation"] = {"seed": 0, "max_tokens": MAX_TOKENS, "temperature": 1.0}
    raw["quality"] = {"min_words": 1, "decontam_ngram": 8}
    (tmp_path / "taxonomy.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    # /health: transformers serve's /v1/models fails without a Hugging Face cache directory
    with http_server([sys.executable, "-c", SERVE, model, str(port)], f"http://127.0.0.1:{port}/health",
                     tmp_path / "serve.log", env=env, timeout_s=180):
        result = run_cli("synth", "generate", str(tmp_path / "taxonomy.yaml"), "--out-dir", str(out),
                         "--endpoint", f"http://127.0.0.1:{port}/v1", "--model", model, "--concurrency", "4",
                         "--request-timeout", "120", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == len({g["prompt_id"] for g in generations}) == NUM_ITEMS
    finishes = [g["finish_reason"] for g in generations]
    assert set(finishes) == {"stop", "length"}  # P(all 16 alike) ~ 1e-4 at these odds
    for g in generations:
        usage = g["usage"]
        assert g["model"].split("@")[0] == model
        assert usage["prompt_tokens"] > 50 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
            "completion_tokens"]
        assert (usage["completion_tokens"] == MAX_TOKENS) == (g["finish_reason"] == "length")
    report = json.loads((out / "report.json").read_text())
    assert report["generated"] == NUM_ITEMS and report["pending"] == 0
    assert report["kept"] + sum(report["dropped"].values()) == NUM_ITEMS
    assert report["dropped"]["truncated"] == finishes.count("length")
    assert report["last_run"]["generated"] == NUM_ITEMS and report["last_run"]["failed"] == 0
    assert report["last_run"]["completion_tokens"] == sum(g["usage"]["completion_tokens"] for g in generations)
    documents = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    assert len(documents) == report["kept"]
    assert report["kept_completion_tokens"] == sum(d["usage"]["completion_tokens"] for d in documents)
    assert all(d["finish_reason"] == "stop" and d["model"].split("@")[0] == model for d in documents)
