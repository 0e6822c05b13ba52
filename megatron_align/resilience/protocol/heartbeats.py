"""Heartbeat files, stack dumps, the stop request and the supervisor's environment variables.

Both sides import this module and nothing of each other: the ranks' heartbeat callback
(:mod:`megatron_align.resilience.inrank.heartbeat`) writes ``<run_dir>/heartbeats/rank_<R>.json``
and dumps stacks on SIGUSR2; the supervisor (:mod:`megatron_align.resilience.supervisor`) reads
them, sends SIGUSR2, writes ``<run_dir>/stop_request`` and sets the environment variables below.
"""

from __future__ import annotations

import json
import os

SUPERVISED_ENV = "MEGATRON_ALIGN_SUPERVISED"
"""Set to 1 by `megatron-align launch` in every rank's environment (heartbeat ``enabled=auto``)."""
ATTEMPT_ENV = "MEGATRON_ALIGN_ATTEMPT"
"""The supervisor's attempt number (0 = first start, 1 = first restart, ...)."""

STOP_REQUEST_FILE = "stop_request"
"""``<run_dir>/stop_request``: written by the supervisor to make every rank checkpoint and stop (the srun path,
where a signal would reach every process of the step, helper processes included)."""
STOP_CHECK_INTERVAL_S = 1.0

# phase of a rank, from its last hook: the supervisor picks the hang timeout by phase.
PHASE_SETUP = "setup"  # process start, model build, checkpoint load, until the first step starts
PHASE_STEP = "step"  # inside a training step (data, forward/backward, optimizer)
PHASE_BETWEEN = "between"  # after a step: checkpoint save, eval, logging
PHASE_DONE = "done"  # training loop returned (or raised)


def heartbeat_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "heartbeats", f"rank_{rank}.json")


def stacks_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "stacks", f"rank_{rank}.txt")


def read_heartbeats(run_dir: str) -> dict[int, dict]:
    """rank -> its newest heartbeat (files being replaced or unreadable are skipped this time)."""
    folder = os.path.join(run_dir, "heartbeats")
    beats: dict[int, dict] = {}
    if not os.path.isdir(folder):
        return beats
    for name in os.listdir(folder):
        if not (name.startswith("rank_") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                beat = json.load(f)
            beats[int(beat["rank"])] = beat
        except (OSError, ValueError, KeyError):
            continue
    return beats
