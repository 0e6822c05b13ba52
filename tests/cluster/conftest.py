"""The cluster for tests/cluster: one real N-node SLURM cluster per test session (slurm_harness.sh).

The session brings the cluster up when the first test needs it and, if this session started it,
takes it down again at the end (daemons stopped, the harness's /etc/hosts line removed). A cluster
that was already running (another session, a developer's `slurm_harness.sh up`) is reused and left
running. Run these tests under `flock /tmp/ma-cluster-tests.lock` when several sessions share a machine.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from cluster_jobs import HARNESS


@pytest.fixture(scope="session")
def cluster() -> list[str]:
    """The node names (n1, n2, n3 with the default MA_SLURM_NODES=3)."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    was_running = subprocess.run(["bash", str(HARNESS), "running"], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(HARNESS), "up"], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"SLURM cannot run here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"slurm harness failed:\n{proc.stdout}\n{proc.stderr}"
    nodes = subprocess.run(["bash", str(HARNESS), "nodes"], capture_output=True, text=True, check=True).stdout.split()
    yield nodes
    if not was_running:
        subprocess.run(["bash", str(HARNESS), "down"], capture_output=True, timeout=300)
