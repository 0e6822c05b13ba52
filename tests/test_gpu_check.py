"""benchmarks/gpu_check.sh + gpu_check.py on a machine without a GPU: it refuses at once, naming what is
missing, before installing anything; the summary writer and the resume comparison work on their own.
(The GPU stages themselves run only on a GPU machine: docs/benchmarks.md "One-call GPU check".)"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

from conftest import REPO

_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "benchmarks", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_the_script_fails_fast_and_clearly_without_a_gpu(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable, WHEELS=str(tmp_path / "no-wheels"))
    result = subprocess.run(["benchmarks/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    expected = "is not Python 3.12" if sys.version_info[:2] != (3, 12) else "needs a CUDA build of torch and a visible GPU"
    assert expected in result.stderr
    assert not (out / "site").exists()  # nothing installed, no GPU time spent


def test_preflight_records_what_is_missing_in_the_summary(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--preflight-only"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == gpu_check.EXIT_MISSING, result.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    problems = summary["preflight"]
    assert any("CPU-only build" in p or "no CUDA GPU visible" in p for p in problems), problems
    assert summary["stages"] == {} and summary["environment"]["megatron-core"]
    assert summary["environment"]["async_save"].startswith("mcore (")
    assert all(p in result.stderr for p in problems)


def test_summary_is_rewritten_after_each_stage_and_fails_on_a_failed_stage(tmp_path):
    path = str(tmp_path / "s" / "gpu_check.json")
    summary = gpu_check.Summary(path, {"python": "3.12.1"})
    summary.record("throughput", "ok", 61.2, results=[{"spec": "local", "tokens_per_s": 1.5e5, "mfu": 0.41}])
    on_disk = json.loads(open(path).read())
    assert on_disk["stages"]["throughput"]["results"][0]["mfu"] == 0.41 and summary.ok
    summary.record("fp8", "skipped", 0.0, reason="Transformer Engine not importable")
    assert summary.ok
    summary.record("resume", "failed", 12.0, max_rel_loss_diff=0.2)
    assert not summary.ok and json.loads(open(path).read())["stages"]["resume"]["status"] == "failed"
    table = summary.table()
    assert "throughput" in table and "spec=local" in table and "max_rel_loss_diff=0.2" in table
    assert not os.path.exists(path + ".tmp")


def test_resume_diff_needs_every_resumed_step_in_the_reference():
    reference = {1: 5.0, 2: 4.0, 3: 3.0}
    assert gpu_check.resume_diff(reference, {2: 4.0, 3: 3.0}) == 0.0
    assert math.isclose(gpu_check.resume_diff(reference, {3: 3.3}), 0.1)
    assert gpu_check.resume_diff(reference, {4: 1.0}) == math.inf and gpu_check.resume_diff(reference, {}) == math.inf
