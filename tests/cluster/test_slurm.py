"""The job scripts on the harness's real SLURM cluster (slurmctld + one slurmd per node on this machine).

tests/cluster/slurm_harness.sh installs Debian's slurm-wlm + munge when missing and starts the
cluster; these tests are skipped only when that is impossible here (the harness exits 3 and says why).
They submit the real scripts with `sbatch`, run the real trainer with the tiny CPU config on 2 tasks,
and check what a user would: metrics, checkpoints, the requeue/resume cycle, preflight's exclude file.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_jobs import (
    HARNESS,
    REPO,
    WAIT_S,
    job_env,
    job_field,
    launch_verb,
    lock_holders,
    read_metrics,
    sbatch,
    tiny_job_config,
    wait_gone,
)

pytestmark = pytest.mark.slow


def test_harness_up_again_finds_the_running_cluster(cluster):
    """The daemons must not inherit the harness's lock: when munged did, every later `up` on the machine
    (a second test session, a second `make test`) waited on it until its timeout."""
    state_dir = os.environ.get("MA_SLURM_STATE_DIR", "/var/lib/ma-slurm")
    assert lock_holders(os.path.join(state_dir, "harness.lock")) == []
    proc = subprocess.run(["bash", str(HARNESS), "up"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert f"nodes {' '.join(cluster)} are up" in proc.stdout


@pytest.fixture(scope="module")
def pretrained(cluster, tiny_corpus, tmp_path_factory) -> tuple[Path, Path]:
    """A 10-step run submitted as the script `slurm render` prints for the tiny CPU config: (run_dir, job log)."""
    tmp_path = tmp_path_factory.mktemp("pretrain")
    config = tiny_job_config(tmp_path, tiny_corpus, train__steps=10, checkpoint__interval=5)
    script = tmp_path / "job.sbatch"
    subprocess.run([sys.executable, "-m", "megatron_align.cli", "slurm", "render", str(config), "--gpus-per-node", "0",
                    "--time", "00:10:00", "--verb", launch_verb(), "-o", str(script)], check=True, cwd=REPO, timeout=60)
    log = tmp_path / "job.out"
    job = sbatch([f"--output={log}", str(script)], job_env())
    assert wait_gone(job, WAIT_S, log) == "COMPLETED", log.read_text()[-3000:]
    return tmp_path / "run", log


def test_rendered_pretrain_job_trains_tiny_config(pretrained):
    run_dir, log = pretrained
    out = log.read_text()
    assert "tasks=2" in out and "finished with exit code 0" in out
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics][-1] == 10
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith("iter_0000010")


def test_midtrain_starts_from_pretrained_checkpoint(pretrained, tiny_corpus, tmp_path):
    run_dir, _ = pretrained
    config = tiny_job_config(tmp_path, tiny_corpus, train__steps=10, checkpoint__interval=10)
    log = tmp_path / "midtrain.out"
    job = sbatch(
        [
            f"--output={log}",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            str(REPO / "slurm" / "midtrain.sbatch"),
            str(config),
        ],
        job_env(MA_VERB=launch_verb(), MA_PRETRAINED_CHECKPOINT=str(run_dir / "checkpoints")),
    )
    state = wait_gone(job, WAIT_S, log)
    out = log.read_text()
    assert f"checkpoint.load={run_dir / 'checkpoints'} checkpoint.load_optimizer=false" in out
    assert state == "COMPLETED", out[-3000:]
    # Starting from the pretrained weights, step 5 is already better than step 5 of the pretraining run.
    midtrain, pretrain = read_metrics(tmp_path / "run"), read_metrics(run_dir)
    assert midtrain[0]["step"] == pretrain[0]["step"] == 5 and midtrain[0]["loss"] < pretrain[0]["loss"]


@pytest.mark.parametrize("verb", ["default", "train"])
def test_usr1_checkpoints_requeues_and_resumes(cluster, tiny_corpus, tmp_path, verb):
    """USR1 (what SLURM sends 180 s before the time limit) -> ranks checkpoint and stop -> the job is
    requeued (by the restart manager, or the script under MA_VERB=train) -> the second run resumes from
    that checkpoint and finishes. "default" is `launch` once it exists; "train" is the script's own
    requeue path (srun megatron-align train)."""
    verb = launch_verb() if verb == "default" else verb
    config = tiny_job_config(tmp_path, tiny_corpus, train__steps=30, checkpoint__interval=5)
    log = tmp_path / "job.out"
    job = sbatch([f"--output={log}", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=00:10:00",
                   str(REPO / "slurm" / "pretrain.sbatch"), str(config)], job_env(MA_VERB=verb))
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.time() + WAIT_S
    while not latest.exists():
        assert time.time() < deadline, (
            f"no checkpoint after {WAIT_S} s\n{log.read_text()[-3000:] if log.exists() else ''}"
        )
        assert job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:]
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
        state, restarts = job_field(job, "JobState"), job_field(job, "Restarts")
        if restarts not in ("", "0") and state == "PENDING":
            pending_since = pending_since or time.time()
            node_state = subprocess.run(["sinfo", "-h", "-N", "-n", ",".join(cluster), "-o", "%T"], capture_output=True,
                                        text=True).stdout
            if time.time() - pending_since > 5 and set(node_state.split()) == {"idle"}:
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            final_since = final_since or time.time()
            assert time.time() - final_since < 20, f"job {state}, not requeued\n{log.read_text()[-3000:]}"
        else:
            final_since = None
        assert time.time() < deadline, f"job was not requeued and restarted (state {state})\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    assert wait_gone(job, WAIT_S, log) == "COMPLETED", log.read_text()[-3000:]

    out = log.read_text()
    assert "USR1: asking the ranks to checkpoint and stop" in out
    # the batch script requeues (`train`), or the restart manager does (`launch`)
    assert "requeueing to continue from the last checkpoint" in out or f"scontrol requeue {job}: done" in out
    assert "restart=1" in out and "resumed from" in out
    steps = [m["step"] for m in read_metrics(tmp_path / "run")]
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
    # $FAKE_SLOW_NODE alone (a one-node test on it) measures 120.5.
    path.write_text(
        "#!/bin/bash\necho \"# stand-in for nccl-tests: $*\"\nbw=$FAKE_BUSBW\n"
        "[[ ${SLURM_STEP_NUM_NODES:-$SLURM_NNODES} == 1 && $SLURMD_NODENAME == \"${FAKE_SLOW_NODE:-}\" ]] && bw=120.5\n"
        "echo \"# Avg bus bandwidth    : $bw \"\n"
    )
    path.chmod(0o755)
    return path


def _exclude_lines(path: Path) -> tuple[list[str], list[str]]:
    lines = path.read_text().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    nodes = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return comments, nodes


def test_preflight_without_gpus_skips_and_writes_empty_exclude_file(cluster, tmp_path):
    log = tmp_path / "preflight.out"
    job = sbatch([f"--output={log}", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
                   str(REPO / "slurm" / "preflight.sbatch")], job_env(MA_PREFLIGHT_DIR=str(tmp_path / "pf")))
    assert wait_gone(job, WAIT_S, log) == "COMPLETED", log.read_text()
    assert "SKIPPING nccl-tests preflight" in log.read_text()
    comments, nodes = _exclude_lines(tmp_path / "pf" / "exclude_nodes.txt")
    assert comments[0] == "# megatron-align preflight exclude list v1"
    assert any("status=skipped: no NVIDIA GPU" in c for c in comments)
    assert nodes == []


def test_preflight_excludes_slow_node_and_pretrain_honours_it(cluster, tiny_corpus, tmp_path):
    """Preflight on every node of the cluster (CPU mode, a stand-in all_reduce_perf that is slow on n2 alone)
    excludes n2; `launch` in a 3-node pretrain job then trains on the other two nodes, `train` refuses the
    allocation, and the script run outside a job submits itself with --exclude."""
    slow = cluster[1]
    env = job_env(MA_PREFLIGHT_DIR=str(tmp_path / "pf"), MA_PREFLIGHT_REQUIRE_GPUS="0", MA_SRUN_MPI="none",
                  MA_NCCL_TESTS_BIN=str(_stand_in_allreduce(tmp_path)), MA_PREFLIGHT_MIN_NODE_BUSBW="300",
                  FAKE_BUSBW="431.2", FAKE_SLOW_NODE=slow)
    exclude = tmp_path / "pf" / "exclude_nodes.txt"
    job = sbatch([f"--output={tmp_path / 'preflight.out'}", f"--nodes={len(cluster)}", "--ntasks-per-node=1",
                  "--gpus-per-node=0", str(REPO / "slurm" / "preflight.sbatch")], env)
    assert wait_gone(job, WAIT_S) == "COMPLETED", (tmp_path / "preflight.out").read_text()
    comments, nodes = _exclude_lines(exclude)
    assert nodes == [slow] and "status=ok" in comments[1]
    assert f"# {slow}: node all_reduce busbw 120.5 < 300 GB/s" in comments

    # `launch` leaves the excluded node out of its srun steps and trains on the other two ...
    config = tiny_job_config(tmp_path, tiny_corpus, train__steps=4, checkpoint__interval=4, parallel__world_size=2,
                             optimizer__warmup_steps=1)
    log = tmp_path / "launch.out"
    job = sbatch([f"--output={log}", f"--nodes={len(cluster)}", "--ntasks-per-node=1", "--gpus-per-node=0",
                  str(REPO / "slurm" / "pretrain.sbatch"), str(config)], dict(env, MA_EXCLUDE_FILE=str(exclude)))
    assert wait_gone(job, WAIT_S, log) == "COMPLETED", log.read_text()[-3000:]
    out = log.read_text()
    used = [n for n in cluster if n != slow][:2]
    assert f"--nodelist={','.join(used)}" in out and f"excluded nodes: {slow}" in out
    assert [m["step"] for m in read_metrics(tmp_path / "run")][-1] == 4

    # ... `train` (plain srun) refuses to train on an allocation that includes it ...
    log = tmp_path / "refused.out"
    job = sbatch([f"--output={log}", f"--nodes={len(cluster)}", "--ntasks-per-node=1", "--gpus-per-node=0",
                  str(REPO / "slurm" / "pretrain.sbatch"), str(config), "run_dir=" + str(tmp_path / "run2")],
                 dict(env, MA_EXCLUDE_FILE=str(exclude), MA_VERB="train"))
    assert wait_gone(job, WAIT_S, log) == "FAILED"
    assert f"allocated node(s) {slow} are listed in {exclude}" in log.read_text()
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()

    # ... and run outside a job, the script submits itself with the exclude list.
    proc = subprocess.run(["bash", str(REPO / "slurm" / "pretrain.sbatch"), str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(env, MA_EXCLUDE_FILE=str(exclude), SBATCH_GPUS_PER_NODE="0",
                                                           SBATCH_NODES=str(len(cluster)), SBATCH_HOLD="1",
                                                           SBATCH_OUTPUT=str(tmp_path / "never.out")))
    assert proc.returncode == 0, proc.stderr
    assert f"with --exclude={slow}" in proc.stderr
    job = proc.stdout.strip().split()[-1]
    try:
        assert job_field(job, "ExcNodeList") == slow
        assert job_field(job, "JobState") == "PENDING"  # 3 nodes asked for, one of them excluded
    finally:
        subprocess.run(["scancel", job])
