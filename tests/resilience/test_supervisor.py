"""`megatron-align launch`: hang watchdog, failure classification, restarts, requeue code, goodput.

Fast tests exercise the pieces in-process (watchdog timeouts, classification, heartbeat files and
stack dumps, checkpoint quarantine rule); the slow ones run real supervised CPU/gloo jobs with the
tiny model and injected faults (kill, hang, SIGUSR1, a corrupt checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import REPO, run_cli, tiny_config, write_yaml

from megatron_align.config import load_config
from megatron_align.config.resilience import SupervisorConfig
from megatron_align.resilience.inrank.heartbeat import HeartbeatCallback
from megatron_align.resilience.protocol.heartbeats import read_heartbeats, stacks_path
from megatron_align.resilience.supervisor.failures import classify_rank, root_cause
from megatron_align.resilience.supervisor.run_report import RunReport, last_logged_step
from megatron_align.resilience.supervisor.supervisor import Supervisor, newest_checkpoint
from megatron_align.resilience.supervisor.watchdog import HangWatchdog
from megatron_align.training.metrics import read_metrics

_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID",
                    "SLURM_PROCID", "SLURM_NTASKS", "MEGATRON_ALIGN_FAULT")
# Quick supervision for tests: no backoff, frequent checks, short grace periods.
_FAST = ["resilience.supervisor.backoff_s=0", "resilience.supervisor.check_interval_s=0.2",
         "resilience.supervisor.term_grace_s=3", "resilience.supervisor.initial_timeout_s=180"]


# -- the pieces --------------------------------------------------------------------------------------
def _beat(rank: int, seq: int, phase: str, steps_done: int = 0, step_time_s: float | None = None, **extra) -> dict:
    return dict(rank=rank, pid=100 + rank, seq=seq, phase=phase, steps_done=steps_done, step_time_s=step_time_s,
                step=extra.pop("step", steps_done), section=extra.pop("section", phase), hostname="h", local_rank=rank,
                **extra)


def test_watchdog_timeouts_follow_warmup_and_phase():
    cfg = SupervisorConfig(initial_timeout_s=100.0, warmup_steps=2, safety_factor=5.0, min_timeout_s=3.0,
                           between_steps_timeout_s=50.0)
    dog = HangWatchdog(cfg, world_size=2)
    dog.start_attempt(0.0)
    assert dog.observe({}, now=99.0) is None  # start-up: the initial timeout applies
    verdict = dog.observe({}, now=101.0)
    assert verdict is not None and verdict.phase == "setup" and verdict.suspects == [0, 1]

    dog.start_attempt(0.0)
    seq = 0
    for t, steps_done in [(10.0, 1), (11.0, 2), (12.0, 3), (13.0, 4)]:  # one step per second after warm-up
        seq += 2
        beats = {r: _beat(r, seq, "step", steps_done, step_time_s=1.0) for r in (0, 1)}
        assert dog.observe(beats, now=t) is None
    assert dog.step_timeout() == 5.0  # 5 x the longest post-warm-up step (1 s), above the 3 s floor
    # Rank 1 hangs before its next step; rank 0 starts the step and waits for it in a collective.
    beats = {0: _beat(0, seq + 1, "step", 4, step_time_s=1.0), 1: _beat(1, seq, "between", 4, step_time_s=1.0)}
    assert dog.observe(beats, now=14.0) is None
    assert dog.observe(beats, now=18.9) is None
    verdict = dog.observe(beats, now=19.1)
    assert verdict is not None and verdict.stalled_rank == 0 and verdict.timeout_s == 5.0
    assert verdict.suspects == [1]  # the least progress: the rank the other one waits for
    assert "rank 1 on h" in verdict.describe()
    # A rank between steps (checkpoint save) gets the long timeout instead.
    assert dog.timeout_for(_beat(1, 0, "between", 4)) == (50.0, "between")


def test_classification_finds_the_culprit_among_victims():
    killed = classify_rank(1, -9, ["[rank 1] step 4"])
    victim = classify_rank(
        0, 1, ["RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"]
    )
    assert (killed.cause, victim.cause) == ("crash", "comm_error")
    assert root_cause([victim, killed]) is killed

    timeout = classify_rank(
        0, 1, ["Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE)"]
    )
    assert timeout.cause == "comm_timeout" and timeout.retryable
    oom = classify_rank(2, 1, ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"])
    assert oom.cause == "oom" and root_cause([timeout, oom]) is oom
    assert classify_rank(0, -9, [], oom_killed=True).cause == "oom"
    assert classify_rank(0, 86, []).cause == "faulty_gpu"
    assert classify_rank(0, 87, []).cause == "numerics"
    assert not classify_rank(0, 93, []).retryable

    bad = classify_rank(0, 2, ["megatron-align train: error on rank 0: train.steps=0: must be > 0"])
    assert bad.cause == "user_error" and not bad.retryable and "train.steps" in bad.detail
    # A damaged checkpoint is known from exit 88 + the rank's record, whatever the library's text said.
    corrupt = classify_rank(0, 88, ["CheckpointException ranks:dict_keys([0])", "Traceback: ..."],
                            load_failure="/r/checkpoints/iter_0000004")
    assert corrupt.cause == "corrupt_checkpoint" and corrupt.retryable
    assert corrupt.checkpoint == "/r/checkpoints/iter_0000004"
    unnamed = classify_rank(0, 88, [])
    assert unnamed.cause == "corrupt_checkpoint" and unnamed.checkpoint is None  # nothing to set aside
    looks_corrupt = classify_rank(0, 2, ["megatron-align train: error on rank 0: loading checkpoint "
                                         "/r/checkpoints/iter_0000004 failed on rank 0: CheckpointingException: ..."])
    assert looks_corrupt.cause == "user_error" and looks_corrupt.checkpoint is None  # text alone decides nothing


def test_checkpoint_load_failure_records_are_read_per_attempt(tmp_path):
    from megatron_align.resilience.protocol import run_files

    run = str(tmp_path)
    assert run_files.read_checkpoint_load_failures(run) == {} and run_files.checkpoint_load_failures_size(run) == 0
    run_files.record_checkpoint_load_failure(run, 1, str(tmp_path / "c" / "iter_0000002"), "old attempt")
    offset = run_files.checkpoint_load_failures_size(run)
    run_files.record_checkpoint_load_failure(run, 0, str(tmp_path / "c" / "iter_0000004"), "multi\nline\nerror")
    with open(tmp_path / run_files.CHECKPOINT_LOAD_FAILURES_FILE, "a") as f:
        f.write('{"rank": 1, "checkp')  # a rank killed mid-write leaves a torn line
    assert run_files.read_checkpoint_load_failures(run, offset) == {0: str(tmp_path / "c" / "iter_0000004")}
    assert run_files.read_checkpoint_load_failures(run)[1] == str(tmp_path / "c" / "iter_0000002")


def test_heartbeat_file_and_stack_dump(tmp_path):
    hb = HeartbeatCallback(str(tmp_path), rank=3, local_rank=1, min_interval_s=0.05)
    try:
        stops = []
        trainer = SimpleNamespace(step=0, stop=stops.append)
        hb.on_train_start(trainer)
        hb.on_step_start(trainer, 1)
        hb.on_section(trainer, "forward_backward", 0.01)
        (tmp_path / "stop_request").write_text("{}")  # the supervisor's stop request (srun path)
        hb.on_step_end(trainer, 1, {})
        assert stops == ["stop requested by the supervisor"]
        deadline = time.time() + 5
        while read_heartbeats(str(tmp_path)).get(3, {}).get("section") != "step_end":
            assert time.time() < deadline, read_heartbeats(str(tmp_path))
            time.sleep(0.02)
        beat = read_heartbeats(str(tmp_path))[3]
        assert (beat["step"], beat["completed_step"], beat["steps_done"], beat["phase"]) == (1, 1, 1, "between")
        assert beat["pid"] == os.getpid() and beat["local_rank"] == 1 and beat["step_time_s"] >= 0
        assert not [n for n in os.listdir(tmp_path / "heartbeats") if ".tmp" in n]  # atomic replace, no leftovers
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.time() + 5
        while "test_heartbeat_file_and_stack_dump" not in open(stacks_path(str(tmp_path), 3)).read():
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        hb.close("test done")
        import faulthandler

        faulthandler.unregister(signal.SIGUSR2)
    assert read_heartbeats(str(tmp_path))[3]["phase"] == "done"


def test_newest_checkpoint_matches_trainer_resolution(tmp_path):
    from megatron_align.training.checkpoint import resolve_checkpoint

    ckpts = tmp_path / "checkpoints"
    for step, files in [(2, ("megatron_align.json", "metadata.json")), (4, ("megatron_align.json", "metadata.json")),
                        (6, ("metadata.json",))]:  # iter 6: shards written, never committed
        (ckpts / f"iter_{step:07d}").mkdir(parents=True)
        for name in files:
            (ckpts / f"iter_{step:07d}" / name).write_text("{}")
    (ckpts / "latest").write_text("iter_0000006\n")
    assert newest_checkpoint(str(ckpts)) == (resolve_checkpoint(str(ckpts)), 4)
    os.replace(ckpts / "iter_0000004", ckpts / "iter_0000004.corrupt-20250101-000000")  # what the supervisor does
    assert newest_checkpoint(str(ckpts)) == (resolve_checkpoint(str(ckpts)), 2)


def test_restarts_drop_one_shot_faults_and_goodput_counts_kept_steps(tmp_path, monkeypatch):
    for var in _DISTRIBUTED_ENV:
        monkeypatch.delenv(var, raising=False)
    path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", "unused-prefix", train={"steps": 8}))
    config = load_config(path, [])
    sup = Supervisor(config, path, [], environ={"MEGATRON_ALIGN_FAULT": "kill@3", "PATH": "/bin"})
    os.makedirs(config.run_dir)
    assert sup._rank_env(0)["MEGATRON_ALIGN_FAULT"] == "kill@3" and sup._rank_env(0)["MEGATRON_ALIGN_SUPERVISED"] == "1"
    assert "MEGATRON_ALIGN_FAULT" not in sup._rank_env(1) and sup._rank_env(1)["MEGATRON_ALIGN_ATTEMPT"] == "1"

    # Logged every 2 steps from step 2 (resumed at 2): steps 3..8 were kept, 1 s each.
    with open(tmp_path / "run" / "metrics.jsonl", "w") as f:
        for step in (2, 4, 6, 8):
            f.write(json.dumps({"step": step, "loss": 1.0, "step_time_s": 1.0}) + "\n")
    report = RunReport(config, start_step=2)
    report.started -= 12.0
    text = report.finish(0, "completed", 8)
    saved = json.loads((tmp_path / "run" / "goodput.json").read_text())
    assert saved["productive_s"] == 6.0 and saved["steps_trained"] == 6
    assert saved["goodput"] == pytest.approx(0.5, abs=0.02) and "goodput 0.5" in text


def test_last_logged_step_reads_the_tail_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert last_logged_step(str(path)) == 0  # no file yet
    with open(path, "w") as f:
        for step in range(1, 2001):
            f.write(json.dumps({"step": step, "loss": 1.0, "note": "x" * 40}) + "\n")
        f.write('{"step": 2001, "lo')  # the rank died mid-write
    assert last_logged_step(str(path), tail_bytes=4096) == 2000


def test_bad_config_exits_2_without_starting(tmp_path, tiny_corpus):
    path = write_yaml(tmp_path / "bad.yaml", tiny_config(tmp_path / "run", tiny_corpus))
    result = run_cli("launch", path, "train.steps=0")
    assert result.returncode == 2, result.stderr
    assert "train.steps" in result.stderr and "error" in result.stderr
    assert not (tmp_path / "run" / "restarts.jsonl").exists() and not (tmp_path / "run" / "heartbeats").exists()


# -- supervised runs -----------------------------------------------------------------------------------
def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _launch(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_align.cli", "launch", *args], cwd=REPO,
                            env={**_env(), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _restarts(run) -> list[dict]:
    path = run / "restarts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _kept(record: dict) -> dict:
    """What must be identical between runs: everything but timings (and per-source counts if present)."""
    return {k: v for k, v in record.items() if not (k.endswith("_s") or "per_s" in k or k in ("tflops_per_gpu", "mfu")
                                                    or k.startswith("straggler"))}


@pytest.mark.slow
@pytest.mark.single_stack  # base stack only: supervisor restart logic; exact resume on each stack is asserted by
# tests/test_cross_stack.py, and restart-from-checkpoint by the corrupt-checkpoint test on both
def test_kill_and_hang_restart_to_identical_losses(tmp_path, tiny_corpus):
    """Rank 1 SIGKILLed at step 4, then rank 0 hangs at step 6: two restarts, same metrics as one clean run; the
    hang verdict and the repeated restarts reach a webhook once each."""
    from test_alerts import Receiver

    sections = dict(parallel={"world_size": 2}, train={"steps": 8})
    reference = tmp_path / "reference"
    result = run_cli("train", write_yaml(tmp_path / "ref.yaml", tiny_config(reference, tiny_corpus, **sections)))
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "faulty"
    config = tiny_config(run, tiny_corpus, resilience={"inject": ["kill@4@1", "hang@6@0"]}, **sections)
    webhook = Receiver()
    proc = _launch(write_yaml(tmp_path / "faulty.yaml", config), *_FAST, "resilience.supervisor.warmup_steps=1",
                   "resilience.supervisor.min_timeout_s=5", "resilience.supervisor.between_steps_timeout_s=60",
                   "resilience.alerts.restarts_per_hour=2", env={"MEGATRON_ALIGN_ALERT_WEBHOOK": webhook.url})
    out, _ = proc.communicate(timeout=900)
    webhook.server.shutdown()
    assert proc.returncode == 0, out[-5000:]
    assert [(b["kind"], b["verdict"], b["rank"], b["run"]) for b in webhook.bodies] == \
        [("hang", "hang", 0, "faulty"), ("restarts", "hang", 0, "faulty")]
    assert all(b["node"] and b["source"] == "supervisor" for b in webhook.bodies)

    kill, hang = _restarts(run)
    assert (kill["cause"], kill["rank"], kill["exit_code"]) == ("crash", 1, -9)
    assert (kill["checkpoint_step"], kill["last_step"], kill["steps_lost"]) == (2, 3, 1)
    assert "kill@4@1" in kill["detail"] and kill["node"]
    assert (hang["cause"], hang["rank"], hang["checkpoint_step"], hang["steps_lost"]) == ("hang", 0, 4, 1)
    assert "HANG: no progress" in out and "hang@6@0" in hang["detail"]
    stacks = (run / "stacks" / "rank_0.txt").read_text()
    assert "inject.py" in stacks and "on_step_start" in stacks  # where the hung rank sleeps
    assert "Thread" in (run / "stacks" / "rank_1.txt").read_text()  # the waiting rank dumped too

    assert [_kept(r) for r in read_metrics(run / "metrics.jsonl")] == [
        _kept(r) for r in read_metrics(reference / "metrics.jsonl")
    ]
    goodput = json.loads((run / "goodput.json").read_text())
    assert goodput["num_restarts"] == 2 and goodput["steps_lost"] == 2 and goodput["final_step"] == 8
    assert 0 < goodput["goodput"] < 1 and all(r["failure_to_first_step_s"] > 0 for r in goodput["restarts"])
    assert "goodput" in out and "2 restart(s) [crash, hang]" in out


@pytest.mark.slow
def test_sigusr1_requeues_then_corrupt_latest_checkpoint_is_set_aside(tmp_path, tiny_corpus):
    """SIGUSR1 -> checkpoint + exit 75; then the newest checkpoint fails to load -> renamed,
    resume from the one before."""
    from megatron_align.resilience.protocol.faults import damage_checkpoint

    run = tmp_path / "run"
    path = write_yaml(tmp_path / "c.yaml", tiny_config(run, tiny_corpus, train={"steps": 400}))
    proc = _launch(path, *_FAST)
    deadline = time.time() + 300
    while read_heartbeats(str(run)).get(0, {}).get("completed_step", 0) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "SIGUSR1: asking the ranks to checkpoint and stop" in out and "stopped to be requeued" in out
    stopped, stop_path = newest_checkpoint(str(run / "checkpoints"))[1], newest_checkpoint(str(run / "checkpoints"))[0]
    assert stopped >= 3 and stopped == read_metrics(run / "metrics.jsonl")[-1]["step"]  # checkpointed where it stopped
    previous = max(s for s in range(2, stopped, 2))  # checkpoint.interval=2

    damage_checkpoint(stop_path, "truncate")
    proc = _launch(path, *_FAST, f"train.stop_at_step={stopped + 1}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    (row,) = _restarts(run)
    assert row["cause"] == "corrupt_checkpoint" and row["checkpoint_step"] == previous, row
    assert [n for n in os.listdir(run / "checkpoints") if n.startswith(os.path.basename(stop_path) + ".corrupt-")]
    assert f"resumed from {run / 'checkpoints' / f'iter_{previous:07d}'}" in out
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == list(range(1, stopped + 2))
