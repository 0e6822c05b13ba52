"""Exclude-node files: the nodes no later attempt or requeue of this run may use.

``<run_dir>/exclude_nodes.txt`` holds node names (:func:`node_name`: the SLURM node name under SLURM, else the
hostname), one per line, deduplicated, rewritten atomically. The in-rank straggler detector and health checks
(policy ``exclude_on_restart`` or ``stop``) write it; the supervisor adds the node of a lost node or an
unattributed GPU fault and passes the list to ``srun --exclude`` (or ``scontrol update ExcNodeList`` on a
requeue). The preflight's exclude file (``resilience.supervisor.exclude_file``) has the same format, with '#'
comments.
"""

from __future__ import annotations

import os
import socket

from megatron_align.fileio import atomic_write_text

EXCLUDE_NODES_FILE = "exclude_nodes.txt"


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
        atomic_write_text(os.path.join(run_dir, EXCLUDE_NODES_FILE), "".join(h + "\n" for h in merged))
    return merged
