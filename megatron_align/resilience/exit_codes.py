"""Exit codes and run-dir files: the whole vocabulary between the ranks and the supervisor.

The supervisor (``megatron-align launch``) never talks to a rank; it reads how the
rank ended and a few files in ``<run_dir>``. A rank's exit code says *what kind* of
failure it saw, so the supervisor can decide *what to do* without parsing logs:

====  =====================  ===========================================================
code  name                   supervisor action
====  =====================  ===========================================================
0     EXIT_OK                done (or a requested stop that was not a requeue)
2     EXIT_USER_ERROR        bad config / missing file: never retried (a restart would
                             fail the same way)
75    EXIT_REQUEUE           stopped on SIGUSR1/SIGTERM after checkpointing (EX_TEMPFAIL
                             from sysexits.h): requeue / restart, nothing is broken
86    EXIT_FAULTY_HARDWARE   a detector blamed hardware (NVML error, SDC checksum,
                             broken collective, DP weight divergence, straggler with
                             policy ``stop``): restart from the newest complete
                             checkpoint *excluding the nodes* in ``exclude_nodes.txt``
87    EXIT_NUMERICS          NaN/Inf or loss spike with policy ``stop``, too many skipped
                             steps, or a trajectory stop: restart from the newest
                             complete checkpoint (same nodes)
88    EXIT_CHECKPOINT_LOAD   this rank could not load checkpoint directory X (any
                             library error, a bad marker, a checksum mismatch); it
                             appended ``{"rank", "checkpoint": X, "error"}`` to
                             ``checkpoint_load_failures.jsonl`` first. The supervisor
                             sets X aside (``X.corrupt-<time>``, never deleted) when X
                             is one of this run's checkpoints and restarts from the one
                             before; otherwise (``checkpoint.load`` of another run, no
                             record) it stops
89    EXIT_STORAGE           a write hit ENOSPC / EDQUOT / EROFS / EIO, or the next checkpoint
                             would not fit (checked before writing); the rank appended
                             ``{rank, path, errno, free_bytes, needed_bytes}`` to
                             ``storage_failures.jsonl``: never retried (the next attempt meets
                             the same disk). The supervisor then exits 89 itself, with one
                             message (space, intact checkpoint, what to do), and under SLURM
                             does *not* requeue: freeing space needs a person, and a requeued
                             job would start and fail again (or sit held) without one
93    EXIT_DO_NOT_REQUEUE    give up: do not restart or requeue (nvidia-resiliency-ext's
                             convention)
====  =====================  ===========================================================

Any other non-zero code (a Python traceback exits 1, a signal 128+N) is an
unclassified crash: the supervisor restarts within its retry budget.

Files in ``<run_dir>`` written by the in-rank detectors (rank 0 only):

- ``exclude_nodes.txt`` -- node names (:func:`node_name`: the SLURM node name under SLURM, else the
  hostname) to leave out of every later launch of this run, attempts and requeues alike, one per line,
  deduplicated, rewritten atomically (temp file + ``os.replace``). Written by the straggler
  detector (policy ``exclude_on_restart`` or ``stop``) and the health checks (same policies).
  :func:`read_exclude_nodes` is the reader.
- ``stragglers.jsonl`` -- one JSON object per flagged (rank, section, score).
- ``health.jsonl`` -- one JSON object per failed or warning health check.
- ``numerics.jsonl`` -- NaN/Inf, spikes, trajectory deviations.
- ``checkpoint_load_failures.jsonl`` -- checkpoint directories a rank failed to load (with exit 88);
  the supervisor reads only the records an attempt appended, never the message text.
- ``storage_failures.jsonl`` -- ``{rank, path, errno, free_bytes, needed_bytes}`` per rank that exited 89
  (any rank, best effort: a full disk may refuse the line; the rank's stderr has it too).
- ``faults_fired.jsonl`` -- injected faults that already fired (every rank appends its own);
  an injection fires at most once per run_dir, so a restart does not re-inject it.
"""

from __future__ import annotations

import json
import os
import socket
import time

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75
EXIT_FAULTY_HARDWARE = 86
EXIT_NUMERICS = 87
EXIT_CHECKPOINT_LOAD = 88
EXIT_STORAGE = 89
EXIT_DO_NOT_REQUEUE = 93

EXCLUDE_NODES_FILE = "exclude_nodes.txt"
STRAGGLERS_FILE = "stragglers.jsonl"
HEALTH_FILE = "health.jsonl"
NUMERICS_FILE = "numerics.jsonl"
FAULTS_FIRED_FILE = "faults_fired.jsonl"
CHECKPOINT_LOAD_FAILURES_FILE = "checkpoint_load_failures.jsonl"
STORAGE_FAILURES_FILE = "storage_failures.jsonl"


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line with a single ``write`` on an O_APPEND descriptor (whole lines, no interleaving)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    line = (json.dumps(dict(record, time=record.get("time", time.time())), default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def record_checkpoint_load_failure(run_dir: str, rank: int, checkpoint: str, error: str) -> None:
    """A rank's note, before it exits ``EXIT_CHECKPOINT_LOAD``, of the checkpoint directory it could not load."""
    append_jsonl(os.path.join(run_dir, CHECKPOINT_LOAD_FAILURES_FILE),
                 {"rank": rank, "checkpoint": os.path.abspath(checkpoint), "error": error})


def checkpoint_load_failures_size(run_dir: str) -> int:
    """Current length of the records file: pass it to :func:`read_checkpoint_load_failures` after an attempt."""
    try:
        return os.path.getsize(os.path.join(run_dir, CHECKPOINT_LOAD_FAILURES_FILE))
    except OSError:
        return 0


def read_checkpoint_load_failures(run_dir: str, offset: int = 0) -> dict[int, str]:
    """rank -> checkpoint directory, from the records appended after byte ``offset`` (one attempt's)."""
    try:
        with open(os.path.join(run_dir, CHECKPOINT_LOAD_FAILURES_FILE), "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return {}
    found = {}
    for line in data.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
            found[int(record["rank"])] = str(record["checkpoint"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of a rank killed mid-write
    return found


def read_jsonl(path: str, since: float = 0.0) -> list[dict]:
    """Records of a run-dir ``.jsonl`` file with ``time >= since`` (torn or unreadable lines skipped; [] if absent)."""
    found = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if float(item.get("time", 0)) >= since:
                    found.append(item)
    except OSError:
        pass
    return found


def node_name(environ=os.environ) -> str:
    """This process's node as the scheduler names it: ``SLURMD_NODENAME`` in a SLURM step (what ``--exclude``
    takes; several SLURM nodes may share one host), else the hostname."""
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


def read_exclude_nodes(run_dir: str) -> list[str]:
    """Node names listed in ``<run_dir>/exclude_nodes.txt`` (empty when the file is absent)."""
    return read_exclude_file(os.path.join(run_dir, EXCLUDE_NODES_FILE))


def read_exclude_file(path: str) -> list[str]:
    """Node names in an exclude file (this format and preflight's: '#' starts a comment); [] when absent."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def add_exclude_nodes(run_dir: str, hostnames: list[str]) -> list[str]:
    """Merge ``hostnames`` into ``exclude_nodes.txt`` (atomic rewrite, order kept); returns the full list."""
    current = read_exclude_nodes(run_dir)
    merged = current + [h for h in dict.fromkeys(hostnames) if h not in current]
    if merged != current:
        path = os.path.join(run_dir, EXCLUDE_NODES_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("".join(h + "\n" for h in merged))
        os.replace(tmp, path)
    return merged


def set_exit_code(trainer, code: int) -> None:
    """Record why this rank will exit (the first verdict wins); ``run_rank`` returns it."""
    if getattr(trainer, "exit_code", None) is None:
        trainer.exit_code = code
