"""The Ray side of ``--executor ray``: join a running cluster, or start a local one for the run that starts on a
loaded machine.

datatrove's ``RayPipelineExecutor`` expects ``ray.init()`` to have been called. :func:`ray_session` does it:

- **A cluster** (``ray.address`` or ``$RAY_ADDRESS``): join it, refuse at once when it has fewer CPUs than one task
  reserves (Ray would wait for them forever), leave it running afterwards.
- **Local**: start a Ray node with exactly the CPUs the run uses (so ``--workers M`` tasks run at once), a small
  object store (the pipeline passes only its plan through it), no dashboard, no usage report (no network here),
  and -- the one setting that matters on a busy machine -- a longer wait for the node's agent processes. The
  raylet waits for its Python agents (dashboard agent, runtime-env agent) to report their ports before it joins;
  with the CPU shared by many processes these take longer than Ray's default and the raylet dies ("Timed out
  waiting for file .../metrics_agent_port_...", then ``ray.init`` raises "The current node timed out during
  startup"). ``RAY_agent_register_timeout_ms`` lengthens that wait (``RAY_worker_register_timeout_seconds`` the
  same for the task processes). Stopped when the run ends.

Task output goes to datatrove's per-task logs (``WORK/logs/tasks-N/shards/logs/``), not to this terminal.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from megatron_align.errors import UserError
from megatron_align.optional import require

_CONNECT_TIMEOUT_S = 10
_INSTALL = "--executor ray (pip install 'megatron-align[ray]', or ray==2.60.0)"


def local_num_cpus(config, tasks: int, workers: int) -> int:
    """CPUs of a local Ray node: ``config.num_cpus``, else cpus_per_task x the tasks run at once (at most the cores)."""
    if config.num_cpus is not None:
        return config.num_cpus
    at_once = workers if workers > 0 else min(tasks, os.cpu_count() or 1)
    return config.cpus_per_task * at_once


def _check_reachable(address: str) -> None:
    """Fail at once on a ``HOST:PORT`` nobody listens on (``ray.init`` retries such an address for minutes)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # ray://, auto, ...: Ray's own lookup
        return
    try:
        socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise UserError(f"ray.address={address!r}: nothing answers there ({err}); start the cluster's head "
                        "(`ray start --head --port PORT`) or drop the address to run on a local Ray") from None


@contextlib.contextmanager
def ray_session(config, tasks: int, workers: int) -> Iterator[None]:
    """Ray initialized for the run (``config``: a :class:`~megatron_align.config.corpus.PipelineRayConfig`)."""
    ray = require("ray", _INSTALL)
    if ray.is_initialized():  # the caller's own session (a notebook, a test): use it as it is
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as err:
            raise UserError(f"ray.address={address!r}: cannot join the Ray cluster ({err}); start it (`ray start "
                            "--head`) or drop the address to run on a local Ray") from err
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < config.cpus_per_task:
            ray.shutdown()
            raise UserError(f"ray.cpus_per_task={config.cpus_per_task}: the cluster at {address} has {cpus:g} CPUs; "
                            "no task could be scheduled")
    else:
        # the raylet and its workers read these at start-up; a user's own setting wins
        os.environ.setdefault("RAY_agent_register_timeout_ms", str(config.start_timeout_s * 1000))
        os.environ.setdefault("RAY_worker_register_timeout_seconds", str(config.start_timeout_s))
        try:
            ray.init(num_cpus=local_num_cpus(config, tasks, workers), include_dashboard=False, log_to_driver=False,
                     object_store_memory=config.object_store_mb << 20)
        except Exception as err:
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise UserError(
                f"--executor ray: the local Ray did not start ({err}); its logs: "
                "/tmp/ray/session_latest/logs (raylet.out first). On a busy machine raise "
                "ray.start_timeout_s, or start Ray yourself (`ray start --head`) and pass --ray-address"
            ) from err
    try:
        yield
    finally:
        ray.shutdown()
