"""A rank's exit record: how and when each rank of an srun step ended, written next to it.

Why: when one rank of a multi-node step dies, srun reports the first task that *exited* (usually a
healthy peer that saw "Connection reset by peer" in its next collective) and then aborts the step;
the dead rank itself is often never reported, and with no accounting database (``sacct``) there
is no other record of its signal. So the supervisor starts every rank of an srun step through
this small wrapper (``python -m megatron_align.resilience.protocol.rank_exit RUN_DIR -- COMMAND ...``): it
runs the rank as its child, waits for it and writes
``<run_dir>/exits/rank_<R>.json`` = ``{rank, node, host, pid, exit_code, signal, time}`` the
moment the child ends (``exit_code`` in the Popen convention: -9 = killed by SIGKILL). The
supervisor orders the ranks' failures by those times (:func:`megatron_align.resilience.supervisor.failures.attribute`).
A rank with no record ended with its node (the wrapper died too): the node is probed.

The rank runs in its own session; when it ends, whatever is left of that session (helper processes such as
the checkpoint writer, which outlive a SIGKILLed rank) is killed, so the task's output closes and
slurmstepd ends the step at once instead of after its 60 s I/O timeout.

The wrapper ignores the signals slurmstepd delivers to every process of a task (USR1, USR2, TERM,
INT: the rank gets them itself), restores default dispositions in the child, and ends the way its
child did (the same exit code, or the same signal), so srun reports the task exactly as before.
It imports nothing heavy: it costs a few MB and milliseconds per rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from megatron_align.fileio import atomic_write_json

EXITS_DIR = "exits"
FORWARDED_BY_SLURMSTEPD = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def exit_record_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, EXITS_DIR, f"rank_{rank}.json")


def read_exit_records(run_dir: str, since: float = 0.0) -> dict[int, dict]:
    """rank -> its exit record written at or after ``since`` (unreadable files are skipped)."""
    folder = os.path.join(run_dir, EXITS_DIR)
    records: dict[int, dict] = {}
    if not os.path.isdir(folder):
        return records
    for name in os.listdir(folder):
        if name.startswith("rank_") and name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    record = json.load(f)
                if float(record["time"]) >= since:
                    records[int(record["rank"])] = record
            except (OSError, ValueError, KeyError):
                continue
    return records


def _child_signals() -> None:
    for sig in FORWARDED_BY_SLURMSTEPD:
        signal.signal(sig, signal.SIG_DFL)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m megatron_align.resilience.protocol.rank_exit RUN_DIR -- COMMAND [ARGS ...]",
              file=sys.stderr)
        return 2
    run_dir, command = argv[0], argv[2:]
    rank = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))
    for sig in FORWARDED_BY_SLURMSTEPD:
        signal.signal(sig, signal.SIG_IGN)
    proc = subprocess.Popen(command, preexec_fn=_child_signals, start_new_session=True)
    code = proc.wait()
    try:  # the rank's helper processes (checkpoint writers) die with it: they would hold the task's stdout/stderr
        os.killpg(proc.pid, signal.SIGKILL)  # open, and slurmstepd waits 60 s for that before it ends the step
    except (ProcessLookupError, PermissionError):
        pass
    record = {"rank": rank, "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
              "host": socket.gethostname(), "pid": proc.pid, "exit_code": code, "signal": -code if code < 0 else None,
              "time": time.time()}
    path = exit_record_path(run_dir, rank)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, record)
    except OSError as err:  # a full or vanished run dir: the supervisor falls back to srun's report
        print(f"megatron-align: rank {rank}: could not write its exit record {path}: {err}", file=sys.stderr)
    if code < 0:
        try:
            signal.signal(-code, signal.SIG_DFL)  # SIGKILL/SIGSTOP cannot be caught: nothing to reset
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), -code)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
