"""The ranks of one attempt behind one interface (:class:`Job`) the supervisor polls, signals and tears down.

:class:`LocalJob` starts ``world_size`` processes of ``megatron-align train`` on this machine
with the torchrun-style environment that :mod:`megatron_align.parallel.spawn` joins (the same
rendezvous as ``train``'s own spawning, on a fresh port per attempt). :class:`SrunJob` runs one
``srun`` step inside the current SLURM allocation (optionally ``--exclude``-ing nodes); srun
forwards signals to every task and ``--label`` lets stderr lines be attributed to ranks; each rank's
own exit record (:mod:`megatron_align.resilience.protocol.rank_exit`) says how it ended before srun does.

Both keep the last lines of every rank's stderr (echoed to the supervisor's stderr as they
arrive) because that is where failures explain themselves (see :mod:`.failures`).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Protocol

from megatron_align.fileio import atomic_write_json
from megatron_align.parallel.spawn import die_with_parent, free_port
from megatron_align.resilience.protocol.heartbeats import STOP_REQUEST_FILE
from megatron_align.resilience.protocol.rank_exit import read_exit_records

STDERR_TAIL_LINES = 200


class _Tee(threading.Thread):
    """Copies a child's stderr to ours, keeping the last lines per rank (``rank_of`` splits srun --label)."""

    def __init__(self, stream, tails: dict[int, collections.deque], default_rank: int | None, rank_of=None) -> None:
        super().__init__(daemon=True, name="megatron-align-stderr")
        self.stream, self.tails, self.default_rank, self.rank_of = stream, tails, default_rank, rank_of

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            try:
                sys.stderr.write(line)
            except (OSError, ValueError):
                pass
            rank = self.rank_of(line) if self.rank_of else self.default_rank
            if rank is not None:
                self.tails.setdefault(rank, collections.deque(maxlen=STDERR_TAIL_LINES)).append(line.rstrip("\n"))
        self.stream.close()


class Job(Protocol):
    """One attempt's ranks, as the supervisor sees them."""

    nodes: list[str]
    """The nodes the step was placed on (empty for local ranks)."""
    task_nodes: dict[int, str]
    """rank -> node, as the launcher reported it."""
    task_seen: dict[int, float]
    """rank -> when the launcher's report of its end was read."""

    def poll(self) -> dict[int, int]:
        """rank -> exit status of every rank known to have ended (Popen convention: -N = killed by signal N)."""

    def alive(self) -> bool: ...

    def all_reported(self) -> bool:
        """Nothing more will be learnt about how the ranks ended (all ended, or every rank's end is known)."""

    def exit_records(self) -> dict[int, dict]:
        """rank -> its own exit record ({exit_code, time, node, ...}) of this attempt; {} where there are none."""

    def lost_nodes(self, nodes: list[str]) -> dict[str, str]:
        """Nodes among ``nodes`` that are gone, with why ({} for local ranks)."""

    def send_signal(self, sig: int) -> None: ...

    def request_stop(self, sig: int, fallback: bool) -> str | None:
        """Ask the ranks to checkpoint and stop (``fallback``: they did not within half the grace period);
        returns a line for the supervisor's log, if any."""

    def terminate(self, grace_s: float) -> None: ...

    def stderr_tail(self, rank: int) -> list[str]: ...


class LocalJob:
    """``world_size`` local rank processes; rank r is ``self.procs[r]``."""

    nodes: list[str] = []
    task_nodes: dict[int, str] = {}
    task_seen: dict[int, float] = {}

    def __init__(self, argv: list[str], world_size: int, env: dict[str, str]) -> None:
        port = free_port()
        self.world_size = world_size
        self.tails: dict[int, collections.deque] = {}
        self.procs: list[subprocess.Popen] = []
        self._tees: list[_Tee] = []
        for rank in range(world_size):
            rank_env = dict(env, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            # Own session per rank (as `train` does): teardown kills the rank's whole process group, helper
            # processes included (checkpoint writers), while signals meant for the trainer go to the rank alone.
            proc = subprocess.Popen([sys.executable, "-m", "megatron_align.cli", *argv], env=rank_env,
                                    stderr=subprocess.PIPE, preexec_fn=die_with_parent, start_new_session=True)
            self.procs.append(proc)
            tee = _Tee(proc.stderr, self.tails, rank)
            tee.start()
            self._tees.append(tee)

    def poll(self) -> dict[int, int]:
        """rank -> exit status of every rank that has ended (Popen convention: -N = killed by signal N)."""
        return {r: c for r, p in enumerate(self.procs) if (c := p.poll()) is not None}

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def all_reported(self) -> bool:
        return not self.alive()

    def exit_records(self) -> dict[int, dict]:
        return {}

    def lost_nodes(self, nodes: list[str]) -> dict[str, str]:
        return {}

    def request_stop(self, sig: int, fallback: bool) -> str | None:
        """Local ranks get the signal itself (once: there is no other way to reach them)."""
        if not fallback:
            self.send_signal(sig)
        return None

    def send_signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def terminate(self, grace_s: float) -> None:
        """SIGTERM every rank, wait up to ``grace_s``, then SIGKILL what is left of each rank's process group."""
        self.send_signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.05, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group may outlive its leader
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()

    def stderr_tail(self, rank: int) -> list[str]:
        self.flush_output()
        return list(self.tails.get(rank, ()))

    def flush_output(self, timeout_s: float = 2.0) -> None:
        """Wait (briefly) until the stderr of ended ranks has been read to the end."""
        deadline = time.time() + timeout_s
        for proc, tee in zip(self.procs, self._tees):
            if proc.poll() is not None:
                tee.join(timeout=max(0.0, deadline - time.time()))


_LABEL = re.compile(r"^\s*(\d+): ")
_TASK_REPORT = re.compile(r"(?:error: (\S+): )?tasks? ([\d,\-]+): (?:Exited with exit code (\d+)|"
                          r"(Killed|Terminated|Segmentation fault|Aborted|Bus error))")


def _expand_ranks(spec: str) -> list[int]:
    """srun's task lists: "1", "0-1", "0,2-3"."""
    ranks: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        if low.isdigit():
            ranks.extend(range(int(low), int(high) + 1) if high.isdigit() else [int(low)])
    return ranks


def allocation_nodes(environ=os.environ) -> list[str]:
    """Hostnames of the current SLURM allocation, in order."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return []
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def lost_nodes(nodes: list[str], timeout_s: float = 2.0) -> dict[str, str]:
    """Nodes among ``nodes`` that are gone, with why: SLURM reports them DOWN / not responding, or their slurmd
    does not accept a connection on its port (a dead slurmd is seen at once, before SLURM's SlurmdTimeout)."""
    lost: dict[str, str] = {}
    if not nodes:
        return lost
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", ",".join(nodes)], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return lost
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        node, state = fields.get("NodeName"), fields.get("State", "")
        if not node or node not in nodes:
            continue
        if any(word in state for word in ("DOWN", "NOT_RESPONDING", "FAIL")):
            lost[node] = f"SLURM node state {state}"
            continue
        addr, port = fields.get("NodeAddr") or node, fields.get("Port")
        if port and port.isdigit():
            try:
                socket.create_connection((addr, int(port)), timeout=timeout_s).close()
            except ConnectionRefusedError:
                lost[node] = f"its slurmd does not answer on {addr}:{port} (connection refused)"
            except OSError:
                pass  # a slow network is not a lost node; SLURM marks a dead one DOWN within SlurmdTimeout
    return lost


def tasks_per_node_of_allocation(environ=os.environ) -> int:
    """First count of SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE (e.g. "8(x4)" -> 8), 0 if unknown."""
    for var in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        match = re.match(r"^(\d+)", environ.get(var, ""))
        if match:
            return int(match.group(1))
    return 0


class SrunJob:
    """One ``srun`` step running ``megatron-align train`` on ``world_size`` tasks of the allocation.

    ``run_dir``: where the ranks' exit records (written by the rank wrapper unless ``rank_command`` replaces it)
    and the stop request go; records older than ``started_at`` belong to earlier attempts."""

    def __init__(self, argv: list[str], world_size: int, env: dict[str, str], exclude: list[str], tasks_per_node: int,
                 srun_args: list[str], rank_command: list[str], master_addr: str, master_port: int, name: str,
                 run_dir: str, started_at: float, nodelist: list[str] | None = None) -> None:
        self.world_size = world_size
        self.name = name
        self.run_dir, self.started_at = run_dir, started_at
        self.tails: dict[int, collections.deque] = {}
        self._task_codes: dict[int, int] = {}
        self.task_nodes: dict[int, str] = {}
        """rank -> node, from srun's own task reports ("srun: error: n2: task 1: Killed")."""
        self.task_seen: dict[int, float] = {}
        """rank -> when srun's report of its end was read."""
        # --overlap (SLURM >= 20.11): a step of a lost node's attempt can stay listed, holding its CPUs on the
        # surviving nodes, for as long as the node is down; without it the next attempt's srun waits on it forever
        # ("Requested nodes are busy"). Our own earlier step is the only other step in the allocation, and its
        # processes are gone by then (terminate() below killed them).
        cmd = ["srun", f"--ntasks={world_size}", "--kill-on-bad-exit=1", "--label", f"--job-name={name}", "--overlap"]
        if tasks_per_node:
            cmd += [f"--ntasks-per-node={tasks_per_node}", f"--nodes={-(-world_size // tasks_per_node)}"]
        if nodelist:
            cmd.append(f"--nodelist={','.join(nodelist)}")
        if exclude:
            cmd.append(f"--exclude={','.join(exclude)}")
        if rank_command:
            rank = list(rank_command)
        else:  # this interpreter; each rank's exit is recorded under <run_dir>/exits/ (resilience.protocol.rank_exit)
            rank = [sys.executable, "-m", "megatron_align.resilience.protocol.rank_exit", run_dir, "--",
                    sys.executable, "-m", "megatron_align.cli"]
        cmd += [*srun_args, *rank, *argv]
        self.command = cmd
        self.nodes = list(nodelist or [])
        step_env = dict(env, MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        self.proc = subprocess.Popen(cmd, env=step_env, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
        self._tee = _Tee(self.proc.stderr, self.tails, None, self._rank_of_line)
        self._tee.start()

    def _rank_of_line(self, line: str) -> int | None:
        match = _LABEL.match(line)
        if match:
            return int(match.group(1))
        # srun's own report: "srun: error: n2: task 3: Exited with exit code 2" / "n1: tasks 0-1: Killed"
        task = _TASK_REPORT.search(line)
        if task:
            node, ranks = task.group(1), _expand_ranks(task.group(2))
            code = int(task.group(3)) if task.group(3) else {"Killed": -9, "Terminated": -15}.get(task.group(4), -11)
            for rank in ranks:
                self._task_codes.setdefault(rank, code)
                self.task_seen.setdefault(rank, time.time())
                if node:
                    self.task_nodes.setdefault(rank, node)
            return ranks[0]
        return None

    def poll(self) -> dict[int, int]:
        """The tasks srun reported as ended (once srun exits with an error and named no task, every rank), overlaid
        with the ranks' own failed exit records: a rank's record comes before srun reports anything (if it ever
        does)."""
        code = self.proc.poll()
        if code is None:
            ended = dict(self._task_codes)
        else:
            self._tee.join(timeout=2.0)
            ended = dict(self._task_codes) if self._task_codes else {r: code for r in range(self.world_size)}
        ended.update({r: int(e["exit_code"]) for r, e in self.exit_records().items() if int(e["exit_code"]) != 0})
        return ended

    def alive(self) -> bool:
        return self.proc.poll() is None

    def all_reported(self) -> bool:
        """Every rank's own exit record is there, or srun is gone: nothing more will come."""
        return len(self.exit_records()) >= self.world_size or not self.alive()

    def exit_records(self) -> dict[int, dict]:
        return read_exit_records(self.run_dir, since=self.started_at)

    def lost_nodes(self, nodes: list[str]) -> dict[str, str]:
        return lost_nodes(nodes)

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)  # srun forwards INT/TERM/USR1/USR2 ... to every task

    def request_stop(self, sig: int, fallback: bool) -> str | None:
        """``<run_dir>/stop_request`` first: a signal through srun would reach every process of the step, checkpoint
        writer helpers included. The signal only as the fallback, or when the run dir refuses the file."""
        name = signal.Signals(sig).name
        if fallback:
            self.send_signal(sig)
            return f"ranks still running: forwarding {name} through srun"
        try:
            atomic_write_json(os.path.join(self.run_dir, STOP_REQUEST_FILE), {"signal": name, "time": time.time()})
        except OSError as err:  # a full run dir: the signal still stops the ranks
            self.send_signal(sig)
            return f"cannot write {STOP_REQUEST_FILE} ({err}): forwarding {name} through srun now"
        return None

    def terminate(self, grace_s: float, step_gone_timeout_s: float = 60.0) -> None:
        """SIGTERM through srun, SIGKILL of srun after ``grace_s``; then the step is killed outright and waited for.

        The next attempt's srun cannot start while this step still holds its nodes (srun then retries with a
        growing delay, tens of seconds), and the step lingers for SLURM's KillWait after srun ends (helper
        processes that ignore SIGTERM, a rank stuck in the kernel): ``scancel --signal=KILL`` skips that wait."""
        self.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=max(0.05, grace_s))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        deadline = time.time() + step_gone_timeout_s
        while self._steps() and time.time() < deadline:
            for step_id in self._steps():
                subprocess.run(["scancel", "--signal=KILL", step_id], capture_output=True, timeout=60)
            time.sleep(0.2)

    def _steps(self) -> list[str]:
        """Ids of this attempt's steps still known to SLURM in our job."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return []
        try:
            steps = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i %j"], capture_output=True, text=True,
                                   timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [line.split()[0] for line in steps.stdout.splitlines() if line.split()[1:] == [self.name]]

    def stderr_tail(self, rank: int) -> list[str]:
        self.flush_output()
        return list(self.tails.get(rank, ()))

    def flush_output(self, timeout_s: float = 2.0) -> None:
        if self.proc.poll() is not None:
            self._tee.join(timeout=timeout_s)


def resolve_ipv4(host: str) -> str:
    """``host``'s IPv4 address, looked up once here, so the ranks' rendezvous gets an address, not a name (a name
    with no IPv6 address makes torch's c10d store warn on every connection attempt); the name if it has none."""
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    except (OSError, IndexError):
        return host


def scontrol(*args: str) -> bool:
    """Run ``scontrol ARGS``; True when it succeeded."""
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def submitted_with_requeue(job: str) -> bool:
    """The SLURM batch job ``job`` was submitted with ``--requeue`` (``scontrol requeue`` will take it)."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Requeue=1" in out.split()
