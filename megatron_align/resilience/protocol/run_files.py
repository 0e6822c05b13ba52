"""The run-dir record files the ranks append and the supervisor reads: names, one append, one read.

The detectors report into JSON Lines files in ``<run_dir>`` (one object per line, each with the ``time`` it was
written), so the supervisor can read what a failed attempt saw without parsing logs, and a person can too:

- ``stragglers.jsonl`` -- one JSON object per flagged (rank, section, score).
- ``health.jsonl`` -- one JSON object per failed or warning health check.
- ``numerics.jsonl`` -- NaN/Inf, spikes, trajectory deviations.
- ``checkpoint_load_failures.jsonl`` -- checkpoint directories a rank failed to load (with exit 88);
  the supervisor reads only the records an attempt appended (from a byte offset), never the message text.
- ``storage_failures.jsonl`` -- ``{rank, path, errno, free_bytes, needed_bytes}`` per rank that exited 89
  (any rank, best effort: a full disk may refuse the line; the rank's stderr has it too).
- ``faults_fired.jsonl`` -- injected faults that already fired (every rank appends its own);
  an injection fires at most once per run_dir, so a restart does not re-inject it.
- ``restarts.jsonl`` -- the supervisor's own: one line per failed attempt (cause, rank, node, action).

Appends are one ``write`` on an ``O_APPEND`` descriptor and reads skip torn lines (:mod:`megatron_align.fileio`).
Exclude-node files are :mod:`.exclude_nodes`, heartbeats :mod:`.heartbeats`, rank exit records :mod:`.rank_exit`.
"""

from __future__ import annotations

import os
import time

from megatron_align.fileio import append_jsonl, file_size, read_jsonl

STRAGGLERS_FILE = "stragglers.jsonl"
HEALTH_FILE = "health.jsonl"
NUMERICS_FILE = "numerics.jsonl"
FAULTS_FIRED_FILE = "faults_fired.jsonl"
CHECKPOINT_LOAD_FAILURES_FILE = "checkpoint_load_failures.jsonl"
STORAGE_FAILURES_FILE = "storage_failures.jsonl"
RESTARTS_FILE = "restarts.jsonl"


def append_record(run_dir: str, name: str, record: dict) -> None:
    """Append ``record`` to ``<run_dir>/<name>``, stamped with the current ``time`` unless it has one."""
    append_jsonl(os.path.join(run_dir, name), dict(record, time=record.get("time", time.time())))


def read_records(run_dir: str, name: str, since: float = 0.0) -> list[dict]:
    """The records of ``<run_dir>/<name>`` written at or after ``since`` (torn lines skipped; [] if absent)."""
    return read_jsonl(os.path.join(run_dir, name), since=since)


def record_checkpoint_load_failure(run_dir: str, rank: int, checkpoint: str, error: str) -> None:
    """A rank's note, before it exits ``EXIT_CHECKPOINT_LOAD``, of the checkpoint directory it could not load."""
    append_record(run_dir, CHECKPOINT_LOAD_FAILURES_FILE,
                  {"rank": rank, "checkpoint": os.path.abspath(checkpoint), "error": error})


def checkpoint_load_failures_size(run_dir: str) -> int:
    """Current length of the records file: pass it to :func:`read_checkpoint_load_failures` after an attempt."""
    return file_size(os.path.join(run_dir, CHECKPOINT_LOAD_FAILURES_FILE))


def read_checkpoint_load_failures(run_dir: str, offset: int = 0) -> dict[int, str]:
    """rank -> checkpoint directory, from the records appended after byte ``offset`` (one attempt's)."""
    found = {}
    for record in read_jsonl(os.path.join(run_dir, CHECKPOINT_LOAD_FAILURES_FILE), offset=offset):
        try:
            found[int(record["rank"])] = str(record["checkpoint"])
        except (ValueError, KeyError, TypeError):
            continue
    return found
