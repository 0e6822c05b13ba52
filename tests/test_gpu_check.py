"""benchmarks/gpu_check.sh + gpu_check.py: without what the GPU stages need (Python 3.12, a CUDA GPU, the wheels)
the script refuses at once, naming the first thing missing, before installing anything; the summary writer and the
resume comparison work on their own. The expectations follow this machine (with or without a GPU). The GPU stages
themselves run only on a GPU machine: docs/benchmarks.md "One-call GPU check"."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

from conftest import REPO

_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "benchmarks", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _cuda_gpu() -> bool:
    import torch

    return torch.version.cuda is not None and torch.cuda.is_available()


def test_the_script_fails_fast_and_clearly_before_installing_anything(tmp_path):
    """No wheels are given, so even a ready GPU machine stops at the preflight: at the first check it fails."""
    out, wheels = tmp_path / "check", tmp_path / "no-wheels"
    env = dict(os.environ, PYTHON=sys.executable, WHEELS=str(wheels))
    result = subprocess.run(["benchmarks/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    if sys.version_info[:2] != (3, 12):
        expected = "is not Python 3.12"
    elif not _cuda_gpu():
        expected = "needs a CUDA build of torch and a visible GPU"
    else:  # a GPU machine: Python and torch pass, the missing wheels are named
        expected = f"no megatron-core wheel in {wheels}/"
    assert expected in result.stderr
    assert not (out / "site").exists()  # nothing installed, no GPU time spent


def test_preflight_records_what_is_missing_in_the_summary(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--preflight-only"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    problems = summary["preflight"]
    assert result.returncode == (gpu_check.EXIT_MISSING if problems else 0), result.stderr
    gpu_problems = [p for p in problems if "CPU-only build" in p or "no CUDA GPU visible" in p]
    assert bool(gpu_problems) != _cuda_gpu(), problems  # named exactly when this machine has no usable GPU
    assert summary["stages"] == {} and summary["environment"]["megatron-core"]
    assert all(p in result.stderr for p in problems)
    assert os.listdir(tmp_path) == ["gpu_check.json"]  # the work directory is elsewhere
    assert not summary["work"].startswith(str(tmp_path))


def test_output_layout_limits_of_what_the_device_brings_back(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu_check.json").write_text("{}")
    for name in ("imports", "throughput", "resume_mcore", "resume_nvrx", "gpu_tests", "fp8"):
        (out / f"{name}.log").write_text("x")
    assert gpu_check.output_layout_problems(str(out)) == []  # the check's own layout: 7 files
    (out / "a" / "b").mkdir(parents=True)
    (out / "a" / "b" / "ok.txt").write_text("x")  # 8 files, 2 folders deep: still fine
    assert gpu_check.output_layout_problems(str(out)) == []
    (out / "extra.log").write_text("x")
    assert gpu_check.output_layout_problems(str(out)) == ["9 files (at most 8)"]
    (out / "extra.log").unlink()
    with open(out / "imports.log", "wb") as f:
        f.truncate(gpu_check.MAX_FILE_BYTES + 1)
    assert gpu_check.output_layout_problems(str(out)) == [f"imports.log: {gpu_check.MAX_FILE_BYTES + 1} bytes "
                                                          f"(at most {gpu_check.MAX_FILE_BYTES})"]
    (out / "imports.log").write_text("x")
    (out / "a" / "b" / "c").mkdir()
    (out / "a" / "b" / "ok.txt").rename(out / "a" / "b" / "c" / "deep.txt")
    assert gpu_check.output_layout_problems(str(out)) == ["a/b/c: 3 folders deep (at most 2)"]
    (out / "a" / "b" / "c" / "deep.txt").rename(out / "a" / "b" / "bad name!.txt")
    (out / "a" / "b" / "c").rmdir()
    assert gpu_check.output_layout_problems(str(out)) == [
        "a/b/bad name!.txt: name outside letters, digits, '.', '_', '-'"]


def test_the_log_copied_out_is_the_short_tail(tmp_path):
    src, dst = tmp_path / "full.log", tmp_path / "short.log"
    src.write_bytes(b"a" * 1000 + b"the end\n")
    gpu_check._copy_tail(str(src), str(dst), limit=8)
    assert dst.read_bytes() == b"the end\n"


def test_deadline_budgets_and_stages_skipped_when_late(tmp_path):
    now = [1000.0]
    deadline = gpu_check.Deadline(end=1300.0, reserve=15, minimum=20, clock=lambda: now[0])
    assert deadline.budget(120) == 120  # plenty left: the stage's own budget
    now[0] = 1200.0
    assert deadline.budget(120) == 85  # 100 left - 15 reserve
    now[0] = 1270.0
    assert deadline.budget(120) is None  # 15 left < reserve + minimum: not started
    assert sum(gpu_check.BUDGETS.values()) > gpu_check.DEADLINE_S  # the deadline, not the sum, bounds the check
    assert gpu_check.DEADLINE_S <= 600 - 60  # from the script's start (install included), 1 minute short of 10

    check = gpu_check.Check(str(tmp_path / "out"), str(tmp_path), deadline, rehearse=True)
    assert check.skip_if_late("throughput")
    assert check.summary.data["stages"]["throughput"]["status"] == "skipped"
    assert "global deadline" in check.summary.data["stages"]["throughput"]["reason"]
    assert not check.summary.ok  # a stage left out for lack of time fails the check
    tight = gpu_check.Check(str(tmp_path / "out2"), str(tmp_path), gpu_check.Deadline(time.time() + 3, reserve=0,
                                                                                       minimum=1), rehearse=True)
    started = time.time()
    code, _, budget = tight.run("gpu_tests", [[sys.executable, "-c", "import time; time.sleep(60)"]])
    assert code == 124 and budget <= 3 and time.time() - started < 30  # killed at the deadline, not the stage budget
    assert "stopped at the stage budget" in (tmp_path / "out2" / "gpu_tests.log").read_text()


def test_summary_is_rewritten_after_each_stage_and_fails_on_a_failed_stage(tmp_path):
    path = str(tmp_path / "s" / "gpu_check.json")
    summary = gpu_check.Summary(path, {"python": "3.12.1"})
    summary.record("throughput", "ok", 61.2, results=[{"spec": "local", "tokens_per_s": 1.5e5, "mfu": 0.41}])
    on_disk = json.loads(open(path).read())
    assert on_disk["stages"]["throughput"]["results"][0]["mfu"] == 0.41 and summary.ok
    summary.record("fp8", "skipped", 0.0, reason="Transformer Engine not importable")
    assert summary.ok
    summary.record("resume_mcore", "failed", 12.0, max_rel_loss_diff=0.2)
    assert not summary.ok and json.loads(open(path).read())["stages"]["resume_mcore"]["status"] == "failed"
    table = summary.table()
    assert "throughput" in table and "spec=local" in table and "max_rel_loss_diff=0.2" in table
    assert not os.path.exists(path + ".tmp")


def test_resume_diff_needs_every_resumed_step_in_the_reference():
    reference = {1: 5.0, 2: 4.0, 3: 3.0}
    assert gpu_check.resume_diff(reference, {2: 4.0, 3: 3.0}) == 0.0
    assert math.isclose(gpu_check.resume_diff(reference, {3: 3.3}), 0.1)
    assert gpu_check.resume_diff(reference, {4: 1.0}) == math.inf and gpu_check.resume_diff(reference, {}) == math.inf


def test_the_gpu_tests_stage_collects_every_file_with_gpu_marked_tests():
    marked = set()
    for root, _, names in os.walk(os.path.join(REPO, "tests")):
        for name in names:
            path = os.path.join(root, name)
            if name.endswith(".py") and "mark.gpu" in open(path).read() and name != "test_gpu_check.py":
                marked.add(os.path.relpath(path, REPO))
    assert marked == set(gpu_check.GPU_TEST_FILES)
