"""One run per run_dir: the lease is taken, refused, inherited and taken over (unit), and a second `train` or
`launch` on a live run_dir is refused at once while the first finishes intact (end to end)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_cli, tiny_config, write_yaml

from megatron_align.training import run_lock
from megatron_align.training.run_lock import RunLock, RunLockConfig, RunLockHeld

FAST = RunLockConfig(heartbeat_s=0.2, stale_after_s=1.0)


def _write_lease(run_dir, **fields) -> None:
    lease = {"token": "f" * 32, "host": "other-node", "pid": 4242, "since": time.time() - 60,
             "heartbeat": time.time(), "slurm_job_id": "777", "command": "megatron-align train"}
    lease.update(fields)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, run_lock.LOCK_FILE), "w") as f:
        json.dump(lease, f)


def test_second_holder_is_refused_naming_the_first_and_ranks_inherit(tmp_path):
    first = RunLock(str(tmp_path), FAST, "megatron-align train").acquire()
    try:
        with pytest.raises(RunLockHeld) as refused:
            RunLock(str(tmp_path), FAST, "megatron-align launch").acquire()
        text = str(refused.value)
        assert socket.gethostname() in text and f"pid {os.getpid()}" in text and "since" in text
        assert "another run_dir" in text  # what to do
        # The holder's ranks run under it; a rank whose token is not the lease's is refused.
        assert run_lock.hold(str(tmp_path), FAST, "train", environ=first.env()) is None
        with pytest.raises(RunLockHeld):
            run_lock.check_inherited(str(tmp_path), {run_lock.TOKEN_ENV: "0" * 32})
        before = run_lock.read_lease(str(tmp_path))["heartbeat"]
        time.sleep(0.5)
        assert run_lock.read_lease(str(tmp_path))["heartbeat"] > before  # heartbeats
    finally:
        first.release()
    assert run_lock.read_lease(str(tmp_path)) is None
    RunLock(str(tmp_path), FAST).acquire().release()  # free again


def test_sigkilled_holder_is_taken_over_with_a_warning(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megatron_align.training.run_lock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockHeld):
            RunLock(str(tmp_path), FAST).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    lock = RunLock(str(tmp_path), FAST).acquire()
    try:
        err = capsys.readouterr().err
        assert "taking over" in err and f"process {holder.pid} is dead" in err
        assert run_lock.read_lease(str(tmp_path))["pid"] == os.getpid()
    finally:
        lock.release()


def test_foreign_host_lease_is_respected_until_its_heartbeat_goes_stale(tmp_path, capsys):
    _write_lease(tmp_path, heartbeat=time.time())
    with pytest.raises(RunLockHeld) as refused:
        RunLock(str(tmp_path), FAST).acquire()
    assert "other-node" in str(refused.value) and "SLURM job 777" in str(refused.value)
    _write_lease(tmp_path, heartbeat=time.time() - 5.0)  # older than stale_after_s=1
    lock = RunLock(str(tmp_path), FAST).acquire()
    try:
        assert "no heartbeat for 5 s" in capsys.readouterr().err
    finally:
        lock.release()


def test_a_holder_whose_lease_was_taken_over_notices(tmp_path, capsys):
    lock = RunLock(str(tmp_path), FAST).acquire()
    try:
        _write_lease(tmp_path)  # someone presumed it dead and took over
        deadline = time.time() + 5
        while not lock.lost and time.time() < deadline:
            time.sleep(0.05)
        assert lock.lost and "taken over" in capsys.readouterr().err
    finally:
        lock.release()
    assert run_lock.read_lease(str(tmp_path))["host"] == "other-node"  # release never removes another's lease


def test_config_checks_heartbeat_against_staleness():
    with pytest.raises(ValueError, match="run_lock.stale_after_s"):
        RunLockConfig(heartbeat_s=10, stale_after_s=15)


def _steps(run_dir) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _wait_for_metrics(proc, run_dir, timeout=240) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.single_stack  # the lock is plain Python: its unit tests above run on both stacks
@pytest.mark.parametrize("verb", ["train", "launch"])
def test_second_run_on_a_live_run_dir_is_refused_and_the_first_is_intact(tmp_path, tiny_corpus, verb):
    run_dir = tmp_path / "run"
    steps = 12
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(run_dir, tiny_corpus, train={"steps": steps},
                                                       checkpoint={"interval": 3, "keep_last": 10}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    first = subprocess.Popen([sys.executable, "-m", "megatron_align.cli", verb, cfg], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_metrics(first, run_dir)
        started = time.time()
        second = run_cli(verb, cfg, timeout=120)  # a double sbatch: the same command again
        took = time.time() - started
        assert second.returncode == run_lock.EXIT_LOCKED, second.stderr[-2000:]
        assert f"in use by megatron-align {verb}" in second.stderr and socket.gethostname() in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert took < 30  # refused at once (the interpreter's start-up is most of it)
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert _steps(run_dir) == list(range(1, steps + 1))
    verified = run_cli("checkpoint", "verify", str(run_dir / "checkpoints"))
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.count(": ok") == steps // 3
    assert not os.path.exists(run_dir / run_lock.LOCK_FILE)  # released at the end


@pytest.mark.slow
@pytest.mark.single_stack
@pytest.mark.parametrize("verb", ["train", "launch"])
def test_a_holder_whose_lock_is_taken_over_kills_its_ranks_without_a_checkpoint(tmp_path, tiny_corpus, verb):
    """Another host took the run_dir over (this holder was presumed dead): the ranks stop at once, nothing more is
    written, exit 2 naming the new holder, and its lease is left alone."""
    run_dir = tmp_path / "run"
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(run_dir, tiny_corpus, train={"steps": 400},
                                                       checkpoint={"interval": 1000},
                                                       run_lock={"heartbeat_s": 0.5, "stale_after_s": 5}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    holder = subprocess.Popen([sys.executable, "-m", "megatron_align.cli", verb, cfg], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_metrics(holder, run_dir)
        _write_lease(run_dir, token="e" * 32, host="node-b")
        out, err = holder.communicate(timeout=60)
    finally:
        holder.kill()
    assert holder.returncode == run_lock.EXIT_LOCKED, err[-3000:]
    assert "the run lock was taken over by" in err and "node-b" in err and "without a checkpoint" in err
    assert run_lock.read_lease(str(run_dir))["token"] == "e" * 32  # the new holder's lease stays
    assert not list((run_dir / "checkpoints").glob("*iter_*"))  # no save on the way out
    assert len(_steps(run_dir)) < 400
