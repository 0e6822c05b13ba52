"""Fault injection points for tests and drills.

``MEGATRON_ALIGN_FAULT`` holds comma-separated ``point@step`` items (optionally
``point@step@rank``); when code reaches ``fault_point(point, step)`` on a
matching rank, the process SIGKILLs itself — the harshest crash, with no
chance to clean up, which is what the commit protocol must survive.
"""

from __future__ import annotations

import os
import signal


def _matches(item: str, point: str, step: int, rank: int) -> bool:
    parts = item.strip().split("@")
    if not parts or parts[0] != point:
        return False
    if len(parts) > 1 and parts[1] and int(parts[1]) != step:
        return False
    if len(parts) > 2 and parts[2] and int(parts[2]) != rank:
        return False
    return True


def fault_point(point: str, step: int) -> None:
    spec = os.environ.get("MEGATRON_ALIGN_FAULT", "")
    if not spec:
        return
    rank = int(os.environ.get("RANK", "0"))
    if any(_matches(item, point, step, rank) for item in spec.split(",")):
        os.kill(os.getpid(), signal.SIGKILL)
