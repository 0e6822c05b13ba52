"""Helpers for the tests in tests/cluster: submit job scripts to the harness's cluster and wait for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "cluster" / "slurm_harness.sh"
# Jobs may wait for another test session's job to finish first.
WAIT_S = 600


def launch_verb() -> str:
    """`launch` once the restart manager exists, else the plain trainer."""
    from megatron_align.cli import VERBS

    return "launch" if "launch" in VERBS else "train"


def lock_holders(lock: str) -> list[str]:
    """Processes with ``lock`` open, as "pid name"."""
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == lock for fd in fds):
                holders.append(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
        except OSError:  # gone, or not ours to read
            continue
    return holders


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MA_REPO"] = str(REPO)
    env.update(extra)
    return env


def sbatch(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    for item in out.split():
        if item.startswith(name + "="):
            return item.split("=", 1)[1]
    return ""


def wait_gone(job: str, timeout_s: float, log: Path | None = None) -> str:
    """Wait until the job left the queue; return its final JobState."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1.0)
    subprocess.run(["scancel", job])
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"job {job} still {job_field(job, 'JobState')} after {timeout_s}s\n{tail}")


def tiny_job_config(tmp_path: Path, corpus_prefix: str, **changes) -> Path:
    """examples/tiny_cpu.yaml with the test's corpus and run directory (everything else unchanged)."""
    cfg = yaml.safe_load((REPO / "examples" / "tiny_cpu.yaml").read_text())
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["data"]["sources"][0]["prefix"] = corpus_prefix
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "tiny_cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
