"""One run per run_dir: an exclusive lock taken before anything in the run dir is touched.

Two writers in one run_dir destroy each other (the second resumes from the first's checkpoint, saves into the
same ``.tmp_iter_*`` directory, and start-up cleanup of ``.tmp_*`` can delete the other's save in progress).
``train`` and ``launch`` therefore take this lock first; the ranks they start inherit it through
``MEGATRON_ALIGN_RUN_LOCK`` (the holder's token) and never take it themselves.

The one idea: a *lease file* with heartbeats, plus ``flock`` where the filesystem honours it.

- ``run_dir/run.lock`` (JSON: host, pid, process start time, boot id, SLURM job id, since, heartbeat, token) is
  created with ``O_CREAT | O_EXCL`` (atomic on local filesystems, NFSv3+ and Lustre), so of two runs starting at
  once exactly one creates it. The holder rewrites it atomically (temporary file + rename) every
  ``run_lock.heartbeat_s``.
- ``flock`` on ``run_dir/.run.flock`` is taken too when the filesystem supports it: on a local disk the kernel
  then refuses a second holder even before the lease is read. It is advisory only: NFS may emulate it with
  POSIX locks or not at all, and Lustre only with ``-o flock``, so the lease file is what decides.
- A lease whose holder is gone is taken over, with a warning naming it: on the same host (same boot) when its
  pid is dead or now belongs to another process (start time differs); on another host when its heartbeat is
  older than ``run_lock.stale_after_s`` (a host cannot see another host's processes). Takeover renames the
  stale lease aside (only one of two racing takers wins the rename) and creates a fresh one with ``O_EXCL``.
- A holder that finds its lease rewritten by someone else (it was presumed dead) stops heartbeating and says so;
  ``train`` and ``launch`` then kill their ranks at once, without a checkpoint, and exit 2
  (:meth:`RunLock.lost_reason`): the new holder owns the run_dir.

Standard library only: the supervisor and the spawning parent take the lock without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from megatron_align.config import RunLockConfig
from megatron_align.errors import UserError
from megatron_align.fileio import atomic_write_json

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
FLOCK_FILE = ".run.flock"
TOKEN_ENV = "MEGATRON_ALIGN_RUN_LOCK"
EXIT_LOCKED = 2  # a UserError: refused before anything ran; the CLI maps UserError to 2


class RunLockHeld(UserError):
    """Another live run holds the run dir."""


def _proc_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def read_lease(run_dir: str) -> dict | None:
    """The lease in ``run_dir`` (None when there is none or it is unreadable half-way through a takeover)."""
    try:
        with open(os.path.join(run_dir, LOCK_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def describe_holder(lease: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    job = f", SLURM job {lease['slurm_job_id']}" if lease.get("slurm_job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("since", 0))))
    age = now - float(lease.get("heartbeat", 0))
    return (f"{lease.get('command', 'a run')} on host {lease.get('host')} (pid {lease.get('pid')}{job}), "
            f"since {since}, last heartbeat {age:.0f} s ago")


def holder_gone(lease: dict, stale_after_s: float, now: float | None = None) -> str | None:
    """Why the lease's holder is gone (a sentence), or None while it may be alive."""
    now = time.time() if now is None else now
    age = now - float(lease.get("heartbeat", 0))
    if lease.get("host") == socket.gethostname() and lease.get("boot_id") == _boot_id():
        pid = int(lease.get("pid", 0))
        if not _pid_alive(pid):
            return f"its process {pid} is dead"
        started = lease.get("pid_start")
        if started and _proc_start_time(pid) not in (None, started):
            return f"pid {pid} now belongs to another process"
        return None
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s (run_lock.stale_after_s={stale_after_s:g})"
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT")
    if job and lease.get("slurm_job_id") == job and int(restarts or 0) > int(lease.get("slurm_restart_count") or 0):
        return f"SLURM requeued job {job} (restart {restarts}): SLURM ends an instance before it starts the next"
    return None


class RunLock:
    """The run dir's lock, held from :meth:`acquire` to :meth:`release` (a context manager too)."""

    def __init__(self, run_dir: str, config: RunLockConfig | None = None, command: str = "megatron-align") -> None:
        self.run_dir = run_dir
        self.config = config or RunLockConfig()
        self.command = command
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self._lost_reason: str | None = None
        self._flock_fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease: dict = {}

    # -- acquiring ------------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        os.makedirs(self.run_dir, exist_ok=True)
        self._take_flock()
        try:
            self._take_lease()
        except BaseException:
            self._drop_flock()
            raise
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _refuse(self, lease: dict | None) -> RunLockHeld:
        holder = describe_holder(lease) if lease else "another process on this host (flock held, no lease yet)"
        return RunLockHeld(
            f"run_dir {self.run_dir} is in use by {holder}. One run per run_dir: wait for it to finish, stop it "
            f"(scancel / kill {lease.get('pid') if lease else ''}), or use another run_dir. A holder that died is "
            f"taken over automatically (same host: at once; another host: after run_lock.stale_after_s="
            f"{self.config.stale_after_s:g} s without heartbeat)."
        )

    def _take_flock(self) -> None:
        try:
            fd = os.open(os.path.join(self.run_dir, FLOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse(self._wait_for_lease()) from None
        except (OSError, ImportError):  # ENOLCK/EOPNOTSUPP: the filesystem has no flock; the lease decides
            os.close(fd)
            return
        self._flock_fd = fd

    def _wait_for_lease(self) -> dict | None:
        """The flock holder writes its lease right after taking the flock: give it a moment, to name it."""
        for _ in range(20):
            lease = read_lease(self.run_dir)
            if lease:
                return lease
            time.sleep(0.05)
        return None

    def _drop_flock(self) -> None:
        if self._flock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._flock_fd)  # closing the descriptor releases the flock
            self._flock_fd = None

    def _new_lease(self) -> dict:
        now = time.time()
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _proc_start_time(os.getpid()), "boot_id": _boot_id(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"), "command": self.command,
                "since": now, "heartbeat": now}

    def _take_lease(self) -> None:
        for _ in range(5):
            lease = self._new_lease()
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(lease, f)
            except OSError:  # a full disk: no empty or torn lease left behind to block the next run
                with contextlib.suppress(OSError):
                    os.remove(self.path)
                raise
            self._lease = lease
            return
        raise self._refuse(read_lease(self.run_dir))

    def _take_over_if_stale(self) -> None:
        """Move a stale lease aside (warning); raise RunLockHeld while its holder may be alive."""
        lease = read_lease(self.run_dir)
        if lease is None:  # being written by its creator this instant, or torn: look again shortly
            time.sleep(0.1)
            lease = read_lease(self.run_dir)
            if lease is None:
                if self._file_age() < self.config.stale_after_s:
                    raise self._refuse(None)
                lease = {"host": "?", "heartbeat": 0}
        why = holder_gone(lease, self.config.stale_after_s)
        if why is None:
            raise self._refuse(lease)
        aside = f"{self.path}.stale-{self.token[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another taker won the rename; retry the exclusive create
        message = (f"taking over run_dir {self.run_dir} from a holder that is gone ({why}): "
                   f"{describe_holder(lease) if lease.get('pid') else 'unreadable lease'}")
        log.warning("%s", message)
        print(f"megatron-align: warning: {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            os.remove(aside)

    def _file_age(self) -> float:
        try:
            return time.time() - os.stat(self.path).st_mtime
        except OSError:
            return 0.0

    # -- holding --------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            current = read_lease(self.run_dir)
            if current is not None and current.get("token") != self.token:
                message = (f"run_dir {self.run_dir}: the run lock was taken over by "
                           f"{describe_holder(current)}; this run no longer holds it")
                self._lost_reason = (f"{message}: its ranks were stopped without a checkpoint, so that only one "
                                     "run writes there (it was presumed dead: no heartbeat for run_lock.stale_after_s)")
                log.error("%s", message)
                print(f"megatron-align: error: {message}", file=sys.stderr, flush=True)
                return
            self._lease["heartbeat"] = time.time()
            try:
                atomic_write_json(self.path, self._lease)
            except OSError as err:  # a full disk: keep trying; the lease goes stale only after stale_after_s
                log.warning("cannot refresh %s: %s", self.path, err)

    def lost_reason(self) -> str | None:
        """Why this holder must stop writing (its lease was taken over), or None while it holds the lock."""
        return self._lost_reason

    @property
    def lost(self) -> bool:
        return self._lost_reason is not None

    def env(self) -> dict[str, str]:
        """Environment for processes this holder starts (its ranks): they run under this lock."""
        return {TOKEN_ENV: self.token}

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        lease = read_lease(self.run_dir)
        if lease and lease.get("token") == self.token:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        self._drop_flock()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_inherited(run_dir: str, environ=os.environ) -> bool:
    """In a rank started by a holder: True when ``MEGATRON_ALIGN_RUN_LOCK`` names the lease in ``run_dir``.
    Raises RunLockHeld when it names a lease that is no longer there (taken over); False without the variable."""
    token = environ.get(TOKEN_ENV)
    if not token:
        return False
    lease = read_lease(run_dir)
    if lease is None or lease.get("token") != token:
        holder = describe_holder(lease) if lease else "nobody (the lease is gone)"
        raise RunLockHeld(f"run_dir {run_dir}: this rank was started under run lock {token[:8]}, but the lock is now "
                          f"held by {holder}; not touching the run dir")
    return True


def hold(run_dir: str, config: RunLockConfig, command: str, environ=os.environ) -> RunLock | None:
    """Take the run dir's lock for ``command``, unless this process runs under its parent's lock (None then)."""
    if check_inherited(run_dir, environ):
        return None
    try:
        return RunLock(run_dir, config, command).acquire()
    except OSError as err:
        from megatron_align.resilience.protocol.storage import storage_errno

        if storage_errno(err) is None:
            raise
        # A full or read-only run dir: nothing else can write there either, and the run's first write stops it
        # with the storage verdict (exit 89, one message), which is what the user must see, not this lock.
        print(f"{command}: warning: cannot write the run lock in {run_dir} ({err}); going on without it",
              file=sys.stderr, flush=True)
        return None


__all__ = ["EXIT_LOCKED", "LOCK_FILE", "TOKEN_ENV", "RunLock", "RunLockConfig", "RunLockHeld", "check_inherited",
           "describe_holder", "hold", "holder_gone", "read_lease"]
