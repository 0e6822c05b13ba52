"""Several SLURM nodes on one machine (slurm_harness.sh, n1..n3): what `launch` does across nodes.

Every test submits a job script the way a user does (`sbatch ... slurm/pretrain.sbatch CONFIG`, which
runs `megatron-align launch` in the batch shell) and checks what the user would look at: the losses
in metrics.jsonl, restarts.jsonl, the summary. The 2-node run trained without faults is the reference
every faulty run must equal step for step (restarts resume from a checkpoint; nothing may be lost).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cluster_jobs import HARNESS, REPO, WAIT_S, job_env, job_field, read_metrics, sbatch, tiny_job_config, wait_gone

pytestmark = pytest.mark.slow
STEPS = 8
SMALL = {"model__hidden_size": 64, "model__ffn_hidden_size": 192, "model__seq_length": 64, "train__steps": STEPS,
         "train__global_batch_size": 4, "train__micro_batch_size": 1, "checkpoint__interval": 2, "logging__interval": 1,
         "optimizer__warmup_steps": 1}
# Quick restarts for the drills: no backoff, short teardown, hang timeouts that fit the tiny model.
FAST = ["resilience.supervisor.backoff_s=0", "resilience.supervisor.term_grace_s=3",
        "resilience.supervisor.check_interval_s=0.5", "resilience.supervisor.warmup_steps=1",
        "resilience.supervisor.min_timeout_s=30", "resilience.supervisor.attribution_wait_s=3"]


def _submit(
    tmp_path: Path, corpus: str, nodes: int, tasks_per_node: int, *overrides: str, extra: tuple = (), **changes
):
    config = tiny_job_config(tmp_path, corpus, **dict(SMALL, **changes))
    log = tmp_path / "job.out"
    job = sbatch([f"--output={log}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
                  "--time=00:15:00", *extra, str(REPO / "slurm" / "pretrain.sbatch"), str(config), *FAST, *overrides],
                 job_env(MA_EXCLUDE_FILE=str(tmp_path / "no-preflight.txt")))
    return job, log, tmp_path / "run"


def _finish(job: str, log: Path) -> str:
    state = wait_gone(job, WAIT_S, log)
    assert state == "COMPLETED", log.read_text()[-4000:]
    return log.read_text()


def _restarts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines() if line.strip()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def _assert_same_losses(run_dir: Path, reference: Path) -> None:
    got, want = _losses(run_dir), _losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    for step in want:
        assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got[step], want[step])


@pytest.fixture(scope="module")
def reference(cluster, tiny_corpus, tmp_path_factory) -> tuple[Path, Path, str]:
    """The same run on 2 nodes x 1 rank and on 1 node x 2 ranks, submitted together: (2-node run, 1-node run, log)."""
    two, one = tmp_path_factory.mktemp("two_nodes"), tmp_path_factory.mktemp("one_node")
    job2, log2, run2 = _submit(two, tiny_corpus, 2, 1)
    job1, log1, run1 = _submit(one, tiny_corpus, 1, 2)
    out = _finish(job2, log2)
    _finish(job1, log1)
    return run2, run1, out


def test_two_node_training_equals_one_node(reference, cluster):
    run2, run1, out = reference
    assert f"--nodelist={cluster[0]},{cluster[1]}" in out
    beats = {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in (run2 / "heartbeats").glob("rank_*.json")}
    assert {r: b["node"] for r, b in beats.items()} == {0: cluster[0], 1: cluster[1]}
    _assert_same_losses(run2, run1)
    # MASTER_ADDR is an address resolved once by the supervisor: no c10d name-resolution warnings.
    assert "cannot be retrieved" not in out, [line for line in out.splitlines() if "cannot be retrieved" in line][:3]


def test_killed_rank_on_n2_is_named_with_its_node_and_signal(reference, cluster, tiny_corpus, tmp_path):
    job, log, run_dir = _submit(tmp_path, tiny_corpus, 2, 1, "resilience.inject=[kill@5@1]")
    out = _finish(job, log)
    (row,) = _restarts(run_dir)
    assert (row["cause"], row["rank"], row["node"], row["signal"]) == ("crash", 1, cluster[1], 9), row
    assert [c["rank"] for c in row["consequences"]] == [0] and row["consequences"][0]["node"] == cluster[0], row
    assert "restarts.jsonl" in out
    _assert_same_losses(run_dir, reference[0])
    # The restart's latency and where it went (detection, teardown, srun start, rendezvous, load, first step).
    goodput = json.loads((run_dir / "goodput.json").read_text())
    (restart,) = goodput["restarts"]
    for key in ("detected_at", "torn_down_at", "restarted_at", "process_started_at", "joined_at", "train_started_at",
                "recovered_at"):
        assert restart[key] is not None, (key, restart)
    fired = [json.loads(line) for line in (run_dir / "faults_fired.jsonl").read_text().splitlines()]
    breakdown = _breakdown(restart, float(fired[0]["time"]))
    (Path(os.environ.get("MA_LATENCY_OUT", tmp_path)) / "restart_latency_multinode.json").write_text(
        json.dumps(breakdown, indent=1)
    )
    print("restart latency across nodes:", json.dumps(breakdown))
    assert breakdown["failure_to_next_step_s"] > 0


def _breakdown(restart: dict, fault_time: float) -> dict:
    """Seconds spent in each phase from the injected fault to the next completed step."""
    marks = [("detect", "detected_at"), ("teardown", "torn_down_at"), ("srun_launch", "restarted_at"),
             ("process_start", "process_started_at"), ("imports_and_rendezvous", "joined_at"),
             ("model_and_checkpoint_load", "train_started_at"), ("first_step", "recovered_at")]
    out, prev = {}, fault_time
    for name, key in marks:
        out[name + "_s"] = round(float(restart[key]) - prev, 2)
        prev = float(restart[key])
    out["failure_to_next_step_s"] = round(float(restart["recovered_at"]) - fault_time, 2)
    return out


def test_faulty_gpu_on_n2_moves_the_run_to_the_spare_node(reference, cluster, tiny_corpus, tmp_path):
    """An SDC verdict (policy stop: exit 86) on the rank on n2: the next attempt runs on n1 + n3 (the spare)."""
    job, log, run_dir = _submit(tmp_path, tiny_corpus, 3, 1, "resilience.inject=[sdc@4@1]",
                                resilience__health={"policy": "stop", "sdc_interval": 1, "sdc_size": 64,
                                                    "collective_interval": 0})
    out = _finish(job, log)
    (row,) = _restarts(run_dir)
    assert (row["cause"], row["rank"], row["node"]) == ("faulty_gpu", 1, cluster[1]), row
    assert row["excluded_nodes"] == [cluster[1]]
    assert f"--nodelist={cluster[0]},{cluster[2]}" in out
    assert f"excluded nodes: {cluster[1]}" in out.split("megatron-align launch: completed")[1]
    assert (run_dir / "exclude_nodes.txt").read_text().split() == [cluster[1]]
    _assert_same_losses(run_dir, reference[0])


def _node_processes(node: str) -> list[int]:
    """Rank processes running as tasks on SLURM node ``node`` (SLURMD_NODENAME in their environment)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURMD_NODENAME={node}".encode() in env:
            pids.append(int(pid))
    return pids


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_lost_node_is_detected_excluded_and_the_run_continues_on_the_spare(reference, cluster, tiny_corpus, tmp_path):
    """n2's slurmd, its step daemon and its rank killed (the node vanishes; SLURM marks it DOWN): the supervisor
    names n2 as lost, excludes it, and finishes on n1 + n3. `--no-kill` keeps the job when one of its nodes fails."""
    lost = cluster[1]
    job, log, run_dir = _submit(tmp_path, tiny_corpus, 3, 1, extra=("--no-kill",))
    try:
        deadline = time.time() + WAIT_S
        while not (run_dir / "metrics.jsonl").exists() or read_metrics(run_dir)[-1]["step"] < 3:
            assert time.time() < deadline and job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
                log.read_text()[-3000:] if log.exists() else "no log"
            time.sleep(0.3)
        ranks = _node_processes(lost)
        victims = set(ranks) | {_parent(p) for p in ranks if Path(f"/proc/{p}").exists()}
        slurmd = int(Path(f"/var/lib/ma-slurm/slurmd-{lost}.pid").read_text())
        for pid in [slurmd, *victims]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed_at = time.time()
        out = _finish(job, log)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
        # Bring n2 back for the tests after this one (`up` starts its slurmd; the node returns to service).
        subprocess.run(["bash", str(HARNESS), "up"], capture_output=True, timeout=300)
    row = _restarts(run_dir)[0]
    assert (row["cause"], row["node"]) == ("node_lost", lost), row
    detected = json.loads((run_dir / "goodput.json").read_text())["restarts"][0]["detected_at"]
    print(f"node {lost} lost: detected after {detected - killed_at:.1f} s")
    assert lost in row["excluded_nodes"]
    assert f"--nodelist={cluster[0]},{cluster[2]}" in out
    _assert_same_losses(run_dir, reference[0])
