"""Rank heartbeats: what the supervisor outside the job knows about each rank.

What: every rank keeps ``<run_dir>/heartbeats/rank_<R>.json`` up to date with where it is
(step, section of the step, phase, time of that event, pid, host and SLURM node, local rank, the
last step's duration, and when the process started, joined the process group and began training:
the start-up part of a restart's latency), and installs ``faulthandler`` on SIGUSR2 so the supervisor can make
every rank write
the Python stacks of all its threads to ``<run_dir>/stacks/rank_<R>.txt``.

Why files: the supervisor talks to the ranks only through the run directory and exit codes
(:mod:`megatron_align.resilience.protocol`), which works the same for local ranks and for srun steps on other
nodes with a shared filesystem, and survives the supervisor's own restart.

The one idea that keeps it cheap: trainer hooks only update a dict in memory and set an event;
a daemon thread writes the newest state at most once per ``min_interval_s`` (temp file +
``os.replace``, so a reader never sees half a file). A rank whose main thread is stuck, in a
collective or anywhere else, stops producing new events, so its file stops changing: that is the
hang signal, and the thread itself never makes a hung rank look alive.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import threading
import time
from typing import Any

from megatron_align.config import RootConfig
from megatron_align.fileio import atomic_write_json
from megatron_align.resilience.protocol.exclude_nodes import node_name
from megatron_align.resilience.protocol.heartbeats import (
    ATTEMPT_ENV,
    PHASE_BETWEEN,
    PHASE_DONE,
    PHASE_SETUP,
    PHASE_STEP,
    STOP_CHECK_INTERVAL_S,
    STOP_REQUEST_FILE,
    SUPERVISED_ENV,
    heartbeat_path,
    stacks_path,
)
from megatron_align.training.callbacks import Callback, TrainerView


class HeartbeatCallback(Callback):
    """Writes this rank's heartbeat file and serves SIGUSR2 stack dumps; one per rank."""

    name = "heartbeat"
    priority = -90  # early: each moment is beaten before the detectors' work on it (a hang there shows its phase)

    def __init__(self, run_dir: str, rank: int, local_rank: int, min_interval_s: float = 0.2) -> None:
        self.path = heartbeat_path(run_dir, rank)
        self.stop_file = os.path.join(run_dir, STOP_REQUEST_FILE)
        self._next_stop_check = 0.0
        self.min_interval_s = min_interval_s
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._state: dict[str, Any] = {
            "rank": rank, "local_rank": local_rank, "pid": os.getpid(), "hostname": socket.gethostname(),
            "node": node_name(), "process_started": process_start_time(), "joined": time.time(), "train_started": None,
            "attempt": int(os.environ.get(ATTEMPT_ENV, "0")), "step": 0, "completed_step": 0, "steps_done": 0,
            "section": "init", "phase": PHASE_SETUP, "time": time.time(), "seq": 0,
            "step_time_s": None, "between_s": None, "checkpoint_s": None,
        }
        self._step_started = 0.0
        self._step_ended: float | None = None
        self._steps_done = 0
        self._lock = threading.Lock()  # guards _state (hooks vs. writer)
        self._write_lock = threading.Lock()  # one writer of the file at a time, snapshots in order
        self._dirty = threading.Event()
        self._closed = False
        self._stacks_file = self._install_stack_dump(run_dir, rank)
        self._flush_quietly()
        self._thread = threading.Thread(target=self._writer, name="megatron-align-heartbeat", daemon=True)
        self._thread.start()

    # -- stack dumps ------------------------------------------------------------------------------
    @staticmethod
    def _install_stack_dump(run_dir: str, rank: int):
        path = stacks_path(run_dir, rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a")  # kept open for the life of the process: faulthandler writes to its fd
        try:
            f.write(f"=== rank {rank} pid {os.getpid()} host {socket.gethostname()} started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')} (stacks below are dumped on SIGUSR2) ===\n")
            f.flush()
        except OSError:  # a full disk: the header is lost, the dump on SIGUSR2 is still tried
            pass
        faulthandler.register(signal.SIGUSR2, file=f, all_threads=True, chain=False)
        return f

    # -- writing ----------------------------------------------------------------------------------
    def _beat(self, section: str, phase: str, **fields: Any) -> None:
        with self._lock:
            self._state.update(fields, section=section, phase=phase, time=time.time(), seq=self._state["seq"] + 1)
        self._dirty.set()

    def _flush(self) -> None:
        with self._write_lock:
            with self._lock:
                snapshot = dict(self._state)
                self._dirty.clear()
            atomic_write_json(self.path, snapshot)

    def _flush_quietly(self) -> None:
        """Write the heartbeat; a full or vanished run dir must not kill training or mask the real error."""
        try:
            self._flush()
        except OSError:
            pass

    def _writer(self) -> None:
        while not self._closed:
            self._dirty.wait()
            if self._closed:
                return
            self._flush_quietly()  # the supervisor then sees no progress; the rank's own error says why
            time.sleep(self.min_interval_s)

    def close(self, section: str) -> None:
        if self._closed:
            return
        self._beat(section, PHASE_DONE)
        self._closed = True
        self._dirty.set()  # wake the writer so it exits
        self._flush_quietly()

    # -- trainer hooks ----------------------------------------------------------------------------
    def on_train_start(self, trainer: TrainerView) -> None:
        self._beat(
            "train_start", PHASE_SETUP, step=trainer.step, completed_step=trainer.step, train_started=time.time()
        )

    def on_step_start(self, trainer: TrainerView, step: int) -> None:
        self._step_started = time.time()
        between = None if self._step_ended is None else self._step_started - self._step_ended
        self._beat("step_start", PHASE_STEP, step=step, between_s=between)

    def on_section(self, trainer: TrainerView, section: str, seconds: float) -> None:
        if section == "checkpoint":
            self._beat(section, PHASE_BETWEEN, checkpoint_s=seconds)
        else:
            self._beat(section, PHASE_STEP)

    def on_step_end(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        self._step_ended = time.time()
        self._steps_done += 1
        self._beat("step_end", PHASE_BETWEEN, step=step, completed_step=step, steps_done=self._steps_done,
                   step_time_s=self._step_ended - self._step_started)
        if self._step_ended >= self._next_stop_check:  # one stat per second, not per step: cheap on shared filesystems
            self._next_stop_check = self._step_ended + STOP_CHECK_INTERVAL_S
            if os.path.exists(self.stop_file):
                trainer.stop("stop requested by the supervisor")

    def on_train_end(self, trainer: TrainerView) -> None:
        self.close("train_end")

    def on_error(self, trainer: TrainerView, error: BaseException) -> None:
        self.close(f"error: {type(error).__name__}")


def process_start_time() -> float | None:
    """Wall-clock time this process started (Linux ``/proc``), None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def heartbeat_enabled(setting: str, environ=os.environ) -> bool:
    return setting == "true" or (setting == "auto" and environ.get(SUPERVISED_ENV) == "1")


def heartbeat_callbacks(config: RootConfig) -> list[Callback]:
    """``[HeartbeatCallback]`` when ``resilience.heartbeat.enabled`` says so (auto: under `launch`)."""
    settings = config.resilience.heartbeat
    if not heartbeat_enabled(settings.enabled):
        return []
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return [HeartbeatCallback(config.run_dir, rank, local_rank, settings.min_interval_s)]
