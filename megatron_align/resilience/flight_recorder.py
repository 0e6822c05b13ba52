"""NCCL Flight Recorder: which rank's last collective differs, for the supervisor's hang report.

PyTorch's ProcessGroupNCCL keeps a ring buffer of its recent collectives per rank when
``TORCH_NCCL_TRACE_BUFFER_SIZE`` > 0 and, with ``TORCH_NCCL_DUMP_ON_TIMEOUT=1``, writes it when its watchdog sees
a collective time out, to ``<prefix><rank>`` (prefix ``TORCH_FR_DUMP_TEMP_FILE``, formerly
``TORCH_NCCL_DEBUG_INFO_TEMP_FILE``). :func:`rank_env` sets these for the ranks (a value the user exported wins),
prefix ``<run_dir>/flight_recorder/rank_``. After a hang verdict the supervisor calls :func:`describe`, which reads
the dumps written during the attempt and names the rank(s) whose last collective (per process group: sequence
number, operation, state) differs from the one most ranks show (on a tie, the furthest one) — a rank that never
entered the collective the others wait in, or entered another one. GPU/NCCL only: on CPU (gloo) nothing is
dumped and the report says nothing.

A dump is a pickle of plain dicts/lists/strings/numbers (``{"version", "pg_config", "entries": [...]}``). It is
read with an Unpickler that resolves no global at all, so a crafted file cannot run code; files over 256 MiB are
skipped. The NCCL watchdog timeout (``parallel.timeout_minutes``) must be shorter than the supervisor's hang
timeout for dumps to exist when the verdict comes (otherwise the stack dumps are the evidence).
"""

from __future__ import annotations

import glob
import io
import os
import pickle
import re
from collections import Counter

DIR = "flight_recorder"
PREFIX = "rank_"
_MAX_BYTES = 256 * 2**20


def rank_env(run_dir: str, environ) -> dict[str, str]:
    """Flight Recorder settings for the ranks' environment (only what the user has not set)."""
    prefix = os.path.join(os.path.abspath(run_dir), DIR, PREFIX)
    wanted = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
              "TORCH_FR_DUMP_TEMP_FILE": prefix, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    return {k: v for k, v in wanted.items() if k not in environ}


class _PlainUnpickler(pickle.Unpickler):
    """Builds only pickle's own types (dict, list, tuple, str, bytes, numbers, bool, None); any global is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"flight recorder dump refers to {module}.{name}; only plain data is read")


def load_dump(path: str) -> dict:
    if os.path.getsize(path) > _MAX_BYTES:
        raise ValueError(f"{path}: larger than {_MAX_BYTES >> 20} MiB")
    with open(path, "rb") as f:
        data = _PlainUnpickler(io.BytesIO(f.read())).load()
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f"{path}: not a flight recorder dump (no 'entries' list)")
    return data


def read_dumps(run_dir: str, since: float = 0.0, prefix: str | None = None) -> tuple[dict[int, dict], dict[int, str]]:
    """({rank: dump} written since ``since``, {rank: why unreadable})."""
    prefix = prefix or os.path.join(run_dir, DIR, PREFIX)
    dumps, bad = {}, {}
    for path in glob.glob(glob.escape(prefix) + "*"):
        match = re.fullmatch(r"(\d+)", path[len(prefix):])
        if not match or os.path.getmtime(path) < since:
            continue
        try:
            dumps[int(match.group(1))] = load_dump(path)
        except (OSError, ValueError, pickle.UnpicklingError, EOFError) as err:
            bad[int(match.group(1))] = str(err)
    return dumps, bad


def last_collectives(dump: dict) -> dict[str, tuple]:
    """Per process group: (collective_seq_id, profiling_name, state) of the newest collective entry."""
    last: dict[str, tuple] = {}
    for entry in dump["entries"]:
        if not isinstance(entry, dict) or entry.get("is_p2p"):
            continue
        group = entry.get("process_group") or (entry.get("pg_id"),)
        key = str(group[0] if isinstance(group, (list, tuple)) else group)
        seq = int(entry.get("collective_seq_id", -1))
        if key not in last or seq >= last[key][0]:
            last[key] = (seq, str(entry.get("profiling_name", "?")), str(entry.get("state", "?")))
    return last


def analyse(dumps: dict[int, dict], world_size: int) -> dict:
    """{"differs": {rank: text}, "missing": [ranks without a dump], "groups": {pg: majority (seq, op, state)}}."""
    per_rank = {rank: last_collectives(d) for rank, d in dumps.items()}
    groups = sorted({g for last in per_rank.values() for g in last})
    differs: dict[int, list[str]] = {}
    majority = {}
    for group in groups:
        seen = {rank: last[group] for rank, last in per_rank.items() if group in last}
        counts = Counter((s, op) for s, op, _state in seen.values())
        # the most ranks agree on it; on a tie the furthest collective (the ranks behind are the ones not arriving)
        common = max(counts, key=lambda sig: (counts[sig], sig[0]))
        majority[group] = common
        for rank, (seq, op, state) in sorted(seen.items()):
            if (seq, op) != common:
                differs.setdefault(rank, []).append(
                    f"process group {group}: last collective #{seq} {op} ({state}), the others' #{common[0]} "
                    f"{common[1]}")
    return {"differs": {r: "; ".join(t) for r, t in differs.items()}, "groups": majority,
            "missing": [r for r in range(world_size) if r not in dumps]}


def describe(run_dir: str, world_size: int, since: float = 0.0) -> tuple[str, list[int]]:
    """(one line for the hang report, the ranks whose last collective differs); ("", []) when no rank dumped."""
    dumps, bad = read_dumps(run_dir, since)
    if not dumps:
        return "", []
    result = analyse(dumps, world_size)
    parts = [f"rank {r}: {text}" for r, text in sorted(result["differs"].items())]
    if not parts:
        parts = ["all dumped ranks stopped at the same collective"]
    if result["missing"]:
        parts.append(f"no dump from ranks {result['missing']}")
    if bad:
        parts.append(f"unreadable dumps from ranks {sorted(bad)}")
    return f"NCCL flight recorder ({os.path.join(run_dir, DIR)}): " + "; ".join(parts), sorted(result["differs"])
