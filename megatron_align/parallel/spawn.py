"""Process spawning: start a job's ranks on this machine, or join the launcher that started us.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or inside an srun step
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) a process *is* one rank (:func:`distributed_env`).
Otherwise :func:`spawn_local` starts ``world_size`` copies of ``megatron-align <verb>`` as ranks,
watches them, and tears all of them down as soon as one fails (exit code of the first failure
is returned), so no rank is left hanging in a collective. Ranks die with their parent
(PR_SET_PDEATHSIG, :func:`die_with_parent`), so a killed launcher leaves no orphans.

Used by ``train`` (:mod:`megatron_align.training.launch`), ``eval propensity`` and the
supervisor's local job (:mod:`megatron_align.resilience.supervisor.jobs`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from megatron_align.errors import UserError


def distributed_env(environ=os.environ) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun or inside an srun step, else None."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ and "SLURM_NTASKS" in environ:
        return int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0))
    return None


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux default


@contextlib.contextmanager
def local_rendezvous() -> Iterator[None]:
    """``MASTER_ADDR``/``MASTER_PORT`` for a one-process group formed in this process, both restored afterwards:
    a library call (an in-process eval, a conversion) must not leave the caller's environment changed."""
    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, chosen *below* the kernel's ephemeral port range.

    The port is closed again before rank 0's TCPStore binds it. A port from ``bind(0)`` lies in the
    ephemeral range, which the kernel hands to the next ``bind(0)`` or outgoing connection of any process
    (gloo's pair sockets, another job's store) in that window, and rank 0 then dies with EADDRINUSE (seen
    on a loaded box). The kernel never hands out ports below the range on its own, so a random free one
    there can only collide with another launcher picking the same port in the same instant.
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the whole range is taken: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_local(argv: list[str], world_size: int, env_extra: dict | None = None,
                abort: Callable[[], str | None] | None = None) -> int:
    """Start ``world_size`` ranks of ``megatron-align <argv>`` on this machine; return the job's exit code.

    ``abort``: polled while the ranks run; when it returns a reason, every rank is killed at once (no grace, so
    nothing more is written) and :class:`~megatron_align.errors.UserError` is raised with that reason."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **(env_extra or {}),
        )
        # Own session per rank: teardown kills the rank's whole process group, including helper processes it
        # spawned (e.g. checkpoint writer workers), which would otherwise outlive a SIGKILLed rank.
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_align.cli", *argv], env=env,
                                      preexec_fn=die_with_parent, start_new_session=True))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                print(f"megatron-align: rank {rank} exited with code {code}; stopping the other ranks", file=sys.stderr)
                _terminate(procs)
                return code if code > 0 else 128 - code  # negative = killed by signal
            if all(c == 0 for c in codes):
                return 0
            reason = abort() if abort is not None else None
            if reason:
                _terminate(procs, grace_s=0.0, first=signal.SIGKILL)
                raise UserError(reason)
            time.sleep(0.2)
    finally:
        _terminate(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(procs: list[subprocess.Popen], grace_s: float = 10.0, first: int = signal.SIGTERM) -> None:
    """``first`` (SIGTERM) to every rank's process group, wait up to ``grace_s``, then SIGKILL what is left."""
    for p in procs:
        _signal_group(p, first)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        _signal_group(p, signal.SIGKILL)  # the group may outlive its leader
        p.wait()
