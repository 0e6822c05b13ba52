"""Profiling: config checks, rank selection, the trace arithmetic of `profile summarize` on a trace with known
intervals, and one 2-rank CPU run whose per-rank Chrome traces `profile summarize` reads back."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from conftest import run_cli, tiny_config, write_yaml

from megatron_align.config import ProfileConfig
from megatron_align.errors import ConfigError
from megatron_align.training.profiling import ProfilerCallback, rank_breakdown, section


def test_profile_config_checks_and_rank_selection(tmp_path):
    with pytest.raises(ConfigError, match="profile.mode='perf'"):
        ProfileConfig(mode="perf")
    with pytest.raises(ConfigError, match="1 <= start_step <= end_step"):
        ProfileConfig(mode="torch", start_step=5, end_step=4)
    callback = ProfilerCallback(ProfileConfig(mode="torch", start_step=1, end_step=1, ranks=[1]))
    trainer = SimpleNamespace(rank=0, run_dir=str(tmp_path), step=0)
    callback.on_train_start(trainer)
    callback.on_step_start(trainer, 1)  # rank 0 is not listed: no profiler, no ranges, nothing waits on it
    assert not callback.active and callback.profiler is None and not section.torch_on
    callback.on_step_end(trainer, 1, {})
    assert not (tmp_path / "profile").exists()

    # a run resumed inside the window (at step 2 of 1-3) profiles from its first step to the end of the window
    callback = ProfilerCallback(ProfileConfig(mode="torch", start_step=1, end_step=3))
    callback.on_train_start(trainer)
    for step in (2, 3):
        callback.on_step_start(trainer, step)
        assert section.torch_on
        callback.on_step_end(trainer, step, {})
    assert not section.torch_on and os.listdir(tmp_path / "profile") == ["rank0_steps1-3.trace.json"]
    names = {e["name"] for e in json.loads((tmp_path / "profile" / "rank0_steps1-3.trace.json").read_text())[
        "traceEvents"]}
    assert {"ma/step_2", "ma/step_3"} <= names and "ma/step_1" not in names


def _x(name: str, ts: float, dur: float, cat: str = "user_annotation") -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 1, "tid": 1}


def test_breakdown_of_a_trace_with_known_intervals():
    # step 1: 0..1000 us; data 0..100, forward_backward 100..700 holding a second data read 200..250 and an
    # all-reduce 600..700, optimizer 700..900 holding an all-reduce 850..900; idle the rest (100 us).
    trace = {"traceEvents": [
        _x("ma/step_1", 0, 1000), _x("ma/data", 0, 100), _x("ma/forward_backward", 100, 600),
        _x("ma/data", 200, 50), _x("gloo:all_reduce", 600, 100), _x("c10d::allreduce_", 600, 100, "cpu_op"),
        _x("ma/optimizer", 700, 200), _x("nccl:all_reduce", 850, 50), _x("aten::mm", 300, 100, "cpu_op"),
        {"ph": "i", "name": "marker", "ts": 5}]}
    got = rank_breakdown(trace)[1]
    expected = {"step": 1000, "data": 150, "communication": 150, "compute": 600 - 50 - 100, "optimizer": 150,
                "checkpoint": 0, "idle": 100}
    assert got == pytest.approx({k: v / 1e6 for k, v in expected.items()})


@pytest.mark.slow
@pytest.mark.single_stack  # base stack only: the profiler callback and trace reading do not depend on megatron-core
def test_two_rank_run_writes_a_trace_per_rank_that_summarize_reads(tmp_path, tiny_corpus):
    run = tmp_path / "run"
    config = tiny_config(run, tiny_corpus, parallel={"world_size": 2}, train={"steps": 4},
                         checkpoint={"interval": 0}, profile={"mode": "torch", "start_step": 2, "end_step": 3})
    result = run_cli("train", write_yaml(tmp_path / "train.yaml", config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["rank0_steps2-3.trace.json",
                                                                   "rank1_steps2-3.trace.json"]
    summary = run_cli("profile", "summarize", str(run), "--json")
    assert summary.returncode == 0, summary.stderr
    ranks = json.loads(summary.stdout)["ranks"]
    assert sorted(ranks) == ["0", "1"]
    for rank in (0, 1):
        events = [e for e in json.loads((run / "profile" / f"rank{rank}_steps2-3.trace.json").read_text())[
            "traceEvents"] if e.get("ph") == "X"]
        steps = {e["name"]: e for e in events if e["name"].startswith("ma/step_")}
        assert sorted(steps) == ["ma/step_2", "ma/step_3"]  # the configured steps, no others
        for n in (2, 3):
            window = steps[f"ma/step_{n}"]
            inside = [e for e in events if window["ts"] <= e["ts"] <= window["ts"] + window["dur"]]
            got = ranks[str(rank)]["per_step"][str(n)]
            # to 1 ns: the trace's microsecond floats, summed in another order by summarize
            assert got["step"] == pytest.approx(window["dur"] / 1e6, rel=0, abs=1e-9)
            data = sum(e["dur"] for e in inside if e["name"] == "ma/data") / 1e6
            assert got["data"] == pytest.approx(data, rel=0, abs=1e-9)
            assert any(e["name"] == "ma/forward_backward" for e in inside)
            assert got["communication"] > 0  # the data-parallel gradient all-reduce (gloo)
            parts = sum(got[k] for k in ("compute", "communication", "data", "optimizer", "checkpoint", "idle"))
            assert parts == pytest.approx(got["step"], rel=0, abs=1e-9)
    text = run_cli("profile", "summarize", str(run))
    assert text.returncode == 0 and "slowest rank" in text.stdout
    assert [line.split()[0] for line in text.stdout.splitlines()[2:4]] == ["0", "1"]


@pytest.mark.slow
@pytest.mark.single_stack
def test_profiling_one_rank_of_two_does_not_hold_up_the_other(tmp_path, tiny_corpus):
    """Megatron-LM #3273: profiling a subset of ranks must not make the others wait in a collective."""
    run = tmp_path / "run"
    config = tiny_config(run, tiny_corpus, parallel={"world_size": 2}, train={"steps": 4},
                         checkpoint={"interval": 0},
                         profile={"mode": "torch", "start_step": 2, "end_step": 3, "ranks": [1]})
    result = run_cli("train", write_yaml(tmp_path / "train.yaml", config), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (run / "profile").iterdir()] == ["rank1_steps2-3.trace.json"]
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]
