"""`synth generate` and `decontam` as datatrove pipelines (`--executor local --tasks 2`): the same bytes as one
process; a task whose prompt keeps failing stays unfinished, the command names its log, and a rerun completes the
plan with every prompt exactly once. The SLURM job arrays are checked in tests/cluster/test_pipeline_slurm.py."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from stub_openai import StubServer
from test_decontam import ITEMS, planted_corpus
from test_synth_generate import NUM_ITEMS, stub_taxonomy

from megatron_align.synth.generate import generation_files, iter_generations
from megatron_align.synth.plan import expand
from megatron_align.synth.taxonomy import load_taxonomy

pytest.importorskip("datatrove")
pytestmark = pytest.mark.single_stack  # standard library, datatrove and this package: nothing differs by stack


def generate(taxonomy: str, out, endpoint: str, *extra: str):
    return run_cli("synth", "generate", taxonomy, "--out-dir", str(out), "--endpoint", endpoint, "--model", "stub",
                   "--concurrency", "2", "--retries", "1", "--backoff", "0.01", "--progress-interval", "0.2", *extra)


def test_generate_with_two_tasks_resumes_a_failed_task_and_equals_one_process(tmp_path):
    taxonomy = stub_taxonomy(tmp_path)
    script = [("doc", {})] * NUM_ITEMS
    script[5] = ("500_always", {})  # task 1 of 2 (odd indices) cannot finish
    with StubServer(script) as stub:
        failed = generate(taxonomy, tmp_path / "tasks", stub.endpoint, "--executor", "local", "--tasks", "2")
        assert failed.returncode == 2, failed.stderr[-2000:]
        assert "a pipeline task failed: task 1: 1 of 8 prompts failed after retries ({'http_500': 1})" in failed.stderr
        assert "pipeline/logs/tasks-2/shards/logs" in failed.stderr
        assert not (tmp_path / "tasks" / "documents.jsonl").exists()  # nothing looks complete
        names = sorted(p.rsplit("/", 1)[-1] for p in generation_files(str(tmp_path / "tasks")))
        assert names == ["generations.task-00000.jsonl", "generations.task-00001.jsonl"]
        stub.script[5] = ("doc", {})
        rerun = generate(taxonomy, tmp_path / "tasks", stub.endpoint, "--executor", "local", "--tasks", "2")
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert stub.attempts[0] == 1  # task 0 finished in the first run and was skipped
        single = generate(taxonomy, tmp_path / "one", stub.endpoint)
        assert single.returncode == 0, single.stderr[-2000:]
    ids = [r["prompt_id"] for r in iter_generations(str(tmp_path / "tasks"))]
    planned = [p.prompt_id for p in expand(load_taxonomy(taxonomy))]
    assert sorted(ids) == sorted(planned) and len(ids) == len(set(ids))
    assert (tmp_path / "tasks" / "documents.jsonl").read_bytes() == (tmp_path / "one" / "documents.jsonl").read_bytes()
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("tasks", "one")]
    for report in reports:
        report.pop("last_run"), report.pop("outputs")
    assert reports[0] == reports[1] and reports[0]["kept"] == NUM_ITEMS


def test_decontam_with_two_tasks_is_byte_identical_and_exits_1_on_held_out(tmp_path):
    planted_corpus(tmp_path)
    common = ["--items", ITEMS, "--held-out", "textbook", "--ngram", "8"]
    inputs = [str(tmp_path / "corpus.jsonl"), str(tmp_path / "corpus.parquet")]
    single = run_cli("decontam", *inputs, *common, "--out-dir", str(tmp_path / "one"))
    tasks = run_cli("decontam", *inputs, *common, "--out-dir", str(tmp_path / "tasks"), "--executor", "local",
                    "--tasks", "2", "--no-progress")
    assert single.returncode == 1 and tasks.returncode == 1, tasks.stderr[-2000:]
    for name in ("kept.jsonl", "contaminated.jsonl"):
        assert (tmp_path / "tasks" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "tasks")]
    for report in reports:
        report.pop("outputs")
    assert reports[0] == reports[1] and reports[0]["held_out_documents"] == 2
    assert not (tmp_path / "tasks.work").exists()  # the shards are removed after the merge
