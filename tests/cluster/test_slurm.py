"""The job scripts on a real single-node SLURM cluster (slurmctld + slurmd on localhost).

tests/cluster/slurm_harness.sh installs Debian's slurm-wlm + munge when missing and starts the
cluster; these tests are skipped only when that is impossible here (the harness exits 3 and says why).
They submit the real scripts with `sbatch`, run the real trainer with the tiny CPU config on 2 tasks,
and check what a user would: metrics, checkpoints, the requeue/resume cycle, preflight's exclude file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "cluster" / "slurm_harness.sh"
pytestmark = pytest.mark.slow
# Jobs are --exclusive on the one node: a job may wait for another test session's job to finish first.
WAIT_S = 600


def _verb() -> str:
    """`launch` once the restart manager exists, else the plain trainer."""
    from megatron_align.cli import VERBS

    return "launch" if "launch" in VERBS else "train"


@pytest.fixture(scope="module")
def cluster():
    """Start (or reuse) the single-node cluster; return the node name. It is left running: another test
    session on this machine may be using it (`slurm_harness.sh down` stops it)."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    proc = subprocess.run(["bash", str(HARNESS), "up"], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"SLURM cannot run here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"slurm harness failed:\n{proc.stdout}\n{proc.stderr}"
    return subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()


def _lock_holders(lock: str) -> list[str]:
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


def test_harness_up_again_finds_the_running_cluster(cluster):
    """The daemons must not inherit the harness's lock: when munged did, every later `up` on the machine
    (a second test session, a second `make test`) waited on it until its timeout."""
    state_dir = os.environ.get("MA_SLURM_STATE_DIR", "/var/lib/ma-slurm")
    assert _lock_holders(os.path.join(state_dir, "harness.lock")) == []
    proc = subprocess.run(["bash", str(HARNESS), "up"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert f"node {cluster} is" in proc.stdout


def _job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MA_REPO"] = str(REPO)
    env.update(extra)
    return env


def _sbatch(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def _job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    for item in out.split():
        if item.startswith(name + "="):
            return item.split("=", 1)[1]
    return ""


def _wait_gone(job: str, timeout_s: float, log: Path | None = None) -> str:
    """Wait until the job left the queue; return its final JobState."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = _job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1.0)
    subprocess.run(["scancel", job])
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"job {job} still {_job_field(job, 'JobState')} after {timeout_s}s\n{tail}")


def _tiny_config(tmp_path: Path, corpus_prefix: str, **changes) -> Path:
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


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pretrained(cluster, tiny_corpus, tmp_path_factory) -> tuple[Path, Path]:
    """A 10-step run submitted as the script `slurm render` prints for the tiny CPU config: (run_dir, job log)."""
    tmp_path = tmp_path_factory.mktemp("pretrain")
    config = _tiny_config(tmp_path, tiny_corpus, train__steps=10, checkpoint__interval=5)
    script = tmp_path / "job.sbatch"
    subprocess.run([sys.executable, "-m", "megatron_align.cli", "slurm", "render", str(config), "--gpus-per-node", "0",
                    "--time", "00:10:00", "--verb", _verb(), "-o", str(script)], check=True, cwd=REPO, timeout=60)
    log = tmp_path / "job.out"
    job = _sbatch([f"--output={log}", str(script)], _job_env())
    assert _wait_gone(job, WAIT_S, log) == "COMPLETED", log.read_text()[-3000:]
    return tmp_path / "run", log


def test_rendered_pretrain_job_trains_tiny_config(pretrained):
    run_dir, log = pretrained
    out = log.read_text()
    assert "tasks=2" in out and "finished with exit code 0" in out
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics][-1] == 10
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith("iter_0000010")


def test_midtrain_starts_from_pretrained_checkpoint(pretrained, tiny_corpus, tmp_path):
    run_dir, _ = pretrained
    config = _tiny_config(tmp_path, tiny_corpus, train__steps=10, checkpoint__interval=10)
    log = tmp_path / "midtrain.out"
    job = _sbatch([f"--output={log}", "--ntasks-per-node=2", "--gpus-per-node=0", str(REPO / "slurm" / "midtrain.sbatch"),
                   str(config)], _job_env(MA_VERB=_verb(), MA_PRETRAINED_CHECKPOINT=str(run_dir / "checkpoints")))
    state = _wait_gone(job, WAIT_S, log)
    out = log.read_text()
    assert f"checkpoint.load={run_dir / 'checkpoints'} checkpoint.load_optimizer=false" in out
    assert state == "COMPLETED", out[-3000:]
    # Starting from the pretrained weights, step 5 is already better than step 5 of the pretraining run.
    midtrain, pretrain = _metrics(tmp_path / "run"), _metrics(run_dir)
    assert midtrain[0]["step"] == pretrain[0]["step"] == 5 and midtrain[0]["loss"] < pretrain[0]["loss"]


@pytest.mark.parametrize("verb", ["default", "train"])
def test_usr1_checkpoints_requeues_and_resumes(cluster, tiny_corpus, tmp_path, verb):
    """USR1 (what SLURM sends 180 s before the time limit) -> ranks checkpoint and stop -> the job is
    requeued (by the restart manager, or the script under MA_VERB=train) -> the second run resumes from
    that checkpoint and finishes. "default" is `launch` once it exists; "train" is the script's own
    requeue path (srun megatron-align train)."""
    verb = _verb() if verb == "default" else verb
    config = _tiny_config(tmp_path, tiny_corpus, train__steps=30, checkpoint__interval=5)
    log = tmp_path / "job.out"
    job = _sbatch([f"--output={log}", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=00:10:00",
                   str(REPO / "slurm" / "pretrain.sbatch"), str(config)], _job_env(MA_VERB=verb))
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.time() + WAIT_S
    while not latest.exists():
        assert time.time() < deadline, f"no checkpoint after {WAIT_S} s\n{log.read_text()[-3000:] if log.exists() else ''}"
        assert _job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:]
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)

    # The job goes back to PENDING with Restarts=1. SLURM holds a requeued job ~2 minutes before it is
    # eligible again; the test lifts that hold instead of waiting.
    # While SLURM requeues a job, `scontrol show job` can briefly report it FAILED or COMPLETED: only a
    # final state that lasts means it was not requeued. The hold is lifted only once the node is idle
    # and the requeue has settled: starting the job again within milliseconds of the requeue makes
    # slurmctld kill it ("Job credential revoked"), which is what the 2-minute hold prevents.
    deadline, final_since, pending_since = time.time() + WAIT_S, None, None
    while "restart=1" not in log.read_text():
        state, restarts = _job_field(job, "JobState"), _job_field(job, "Restarts")
        if restarts not in ("", "0") and state == "PENDING":
            pending_since = pending_since or time.time()
            node_state = subprocess.run(["sinfo", "-h", "-n", cluster, "-o", "%T"], capture_output=True, text=True).stdout
            if time.time() - pending_since > 5 and node_state.strip() == "idle":
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            final_since = final_since or time.time()
            assert time.time() - final_since < 20, f"job {state}, not requeued\n{log.read_text()[-3000:]}"
        else:
            final_since = None
        assert time.time() < deadline, f"job was not requeued and restarted (state {state})\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    assert _wait_gone(job, WAIT_S, log) == "COMPLETED", log.read_text()[-3000:]

    out = log.read_text()
    assert "USR1: asking the ranks to checkpoint and stop" in out
    # the batch script requeues (`train`), or the restart manager does (`launch`)
    assert "requeueing to continue from the last checkpoint" in out or f"scontrol requeue {job}: done" in out
    assert "restart=1" in out and "resumed from" in out
    steps = [m["step"] for m in _metrics(tmp_path / "run")]
    assert steps[-1] == 30 and steps == sorted(set(steps)), steps  # no step lost or logged twice
    resumed_at = int(out.split("resumed from")[1].split("at step")[1].split()[0])
    assert 0 < resumed_at < 30

    # Graceful part: the ranks saved a checkpoint at the step where they stopped, and resumed from it.
    first_run = out.split("restart=1")[0]
    # (SLURM signals every process of the step; the checkpoint writer's Manager process is started with
    # USR1/TERM blocked so it survives: training.checkpoint._start_writer_manager_with_signals_blocked.)
    assert "Traceback" not in first_run, first_run[-3000:]
    stopped_at = int(first_run.split("training stop requested")[1].split("at step")[1].split(";")[0])
    assert resumed_at == stopped_at


def _stand_in_allreduce(tmp_path: Path) -> Path:
    """Stands in for nccl-tests' all_reduce_perf (no GPUs here): prints its summary line with $FAKE_BUSBW."""
    path = tmp_path / "all_reduce_perf"
    path.write_text("#!/bin/bash\necho \"# stand-in for nccl-tests: $*\"\necho \"# Avg bus bandwidth    : ${FAKE_BUSBW} \"\n")
    path.chmod(0o755)
    return path


def _exclude_lines(path: Path) -> tuple[list[str], list[str]]:
    lines = path.read_text().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    nodes = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return comments, nodes


def test_preflight_without_gpus_skips_and_writes_empty_exclude_file(cluster, tmp_path):
    log = tmp_path / "preflight.out"
    job = _sbatch([f"--output={log}", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
                   str(REPO / "slurm" / "preflight.sbatch")], _job_env(MA_PREFLIGHT_DIR=str(tmp_path / "pf")))
    assert _wait_gone(job, WAIT_S, log) == "COMPLETED", log.read_text()
    assert "SKIPPING nccl-tests preflight" in log.read_text()
    comments, nodes = _exclude_lines(tmp_path / "pf" / "exclude_nodes.txt")
    assert comments[0] == "# megatron-align preflight exclude list v1"
    assert any("status=skipped: no NVIDIA GPU" in c for c in comments)
    assert nodes == []


def test_preflight_excludes_slow_node_and_pretrain_honours_it(cluster, tiny_corpus, tmp_path):
    env = _job_env(MA_PREFLIGHT_DIR=str(tmp_path / "pf"), MA_PREFLIGHT_REQUIRE_GPUS="0", MA_SRUN_MPI="none",
                   MA_NCCL_TESTS_BIN=str(_stand_in_allreduce(tmp_path)), MA_PREFLIGHT_MIN_NODE_BUSBW="300")
    exclude = tmp_path / "pf" / "exclude_nodes.txt"
    preflight = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", str(REPO / "slurm" / "preflight.sbatch")]

    job = _sbatch([f"--output={tmp_path / 'fast.out'}", *preflight], dict(env, FAKE_BUSBW="431.2"))
    assert _wait_gone(job, WAIT_S) == "COMPLETED"
    assert _exclude_lines(exclude)[1] == []

    job = _sbatch([f"--output={tmp_path / 'slow.out'}", *preflight], dict(env, FAKE_BUSBW="120.5"))
    assert _wait_gone(job, WAIT_S) == "COMPLETED"
    comments, nodes = _exclude_lines(exclude)
    assert nodes == [cluster] and "status=ok" in comments[1]
    assert f"# {cluster}: node all_reduce busbw 120.5 < 300 GB/s" in comments

    # A pretrain job that lands on the excluded node refuses to train there ...
    config = _tiny_config(tmp_path, tiny_corpus)
    log = tmp_path / "refused.out"
    job = _sbatch([f"--output={log}", "--ntasks-per-node=2", "--gpus-per-node=0", str(REPO / "slurm" / "pretrain.sbatch"),
                   str(config)], dict(env, MA_EXCLUDE_FILE=str(exclude)))
    assert _wait_gone(job, WAIT_S, log) == "FAILED"
    assert f"allocated node(s) {cluster} are listed in {exclude}" in log.read_text()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    # ... and run outside a job, the script submits itself with the exclude list.
    proc = subprocess.run(["bash", str(REPO / "slurm" / "pretrain.sbatch"), str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(env, MA_EXCLUDE_FILE=str(exclude), SBATCH_GPUS_PER_NODE="0",
                                                           SBATCH_OUTPUT=str(tmp_path / "never.out")))
    assert proc.returncode == 0, proc.stderr
    assert f"with --exclude={cluster}" in proc.stderr
    job = proc.stdout.strip().split()[-1]
    try:
        assert _job_field(job, "ExcNodeList") == cluster
        assert _job_field(job, "JobState") == "PENDING"  # the only node is excluded
    finally:
        subprocess.run(["scancel", job])
