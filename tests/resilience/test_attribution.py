"""Who failed first: per-rank exit records (resilience.rank_exit) and the attribution rule (failures.attribute)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from megatron_align.resilience.protocol.rank_exit import exit_record_path, read_exit_records
from megatron_align.resilience.supervisor.failures import attribute, classify_rank

RESET = "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"


def _failure(rank, code, lines, node, at):
    failure = classify_rank(rank, code, lines)
    failure.node, failure.observed_at = node, at
    return failure


def test_the_rank_that_died_first_is_blamed_and_its_peers_are_consequences():
    # Rank 1 on n2 SIGKILLed; rank 0 then reports the reset connection (seen first by srun) -> rank 1.
    victim, killed = _failure(0, 1, [RESET], "n1", 10.0), _failure(1, -9, [], "n2", 10.5)
    culprit = attribute([victim, killed])
    assert (culprit.rank, culprit.node, culprit.signal) == (1, "n2", 9)
    assert culprit.consequences == [{"rank": 0, "node": "n1", "cause": "comm_error", "status": "exit code 1"}]
    # Rank 0 crashes for its own reason; srun's --kill-on-bad-exit then SIGKILLs rank 1 -> rank 0.
    crash, killed_by_srun = _failure(0, 1, ["ValueError: bad batch"], "n1", 10.0), _failure(1, -9, [], "n2", 10.4)
    culprit = attribute([killed_by_srun, crash])
    assert culprit.rank == 0 and culprit.consequences[0]["rank"] == 1
    # Two ranks killed: the one that died first.
    assert attribute([_failure(0, -9, [], "n1", 11.0), _failure(1, 137, [], "n2", 10.0)]).rank == 1


def test_rank_exit_wrapper_records_the_signal_and_dies_the_same_way(tmp_path):
    env = dict(os.environ, SLURM_PROCID="3", SLURMD_NODENAME="n7")
    cmd = [sys.executable, "-m", "megatron_align.resilience.protocol.rank_exit", str(tmp_path), "--"]
    proc = subprocess.run([*cmd, sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                          env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL  # srun sees the same death as without the wrapper
    record = json.loads(open(exit_record_path(str(tmp_path), 3)).read())
    assert (record["rank"], record["node"], record["exit_code"], record["signal"]) == (3, "n7", -9, 9)
    proc = subprocess.run(
        [*cmd, sys.executable, "-c", "raise SystemExit(86)"], env=dict(env, SLURM_PROCID="0"), timeout=60
    )
    assert proc.returncode == 86
    records = read_exit_records(str(tmp_path))
    assert {r: e["exit_code"] for r, e in records.items()} == {0: 86, 3: -9}
    assert read_exit_records(str(tmp_path), since=record["time"] + 3600) == {}
