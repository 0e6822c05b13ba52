"""Why did an attempt end? Classify a failed job from exit codes and the ranks' stderr.

The supervisor's decision (restart, restart elsewhere, quarantine a checkpoint, give up) depends
on the *cause*, and a crashing job usually tells it in three places: the exit code a rank chose
(:mod:`megatron_align.resilience.protocol.exit_codes`), the signal that killed a rank, and the last lines
the rank wrote to stderr (CUDA OOM text, NCCL/gloo timeout messages, a UserError). A damaged
checkpoint is known from our own code alone: exit 88 plus the directory the rank recorded in
``checkpoint_load_failures.jsonl``, whatever error text the checkpoint library of the day produced.

When several ranks fail together, most of them are *victims*: one rank dies and its peers then
fail in the next collective ("Connection closed by peer", a collective timeout), or srun's
``--kill-on-bad-exit`` kills them. :func:`attribute` finds the rank that failed *first*: a
communication error on a rank is a consequence when another rank failed otherwise, and so is a
rank killed by a signal after another rank's failure had already been seen (srun or the
teardown killed it); of the rest, the most specific cause (a lost node, hardware, numerics, OOM,
a bad checkpoint, a user error) wins over generic crashes, then the earliest seen, then the
lowest rank. The others are recorded as the culprit's ``consequences``.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field

from megatron_align.resilience.protocol.exit_codes import (
    EXIT_CHECKPOINT_LOAD,
    EXIT_DO_NOT_REQUEUE,
    EXIT_FAULTY_HARDWARE,
    EXIT_NUMERICS,
    EXIT_REQUEUE,
    EXIT_STORAGE,
    EXIT_USER_ERROR,
)

# cause -> (priority: lower wins when several ranks fail together, retried?)
CAUSES: dict[str, tuple[int, bool]] = {
    "node_lost": (0, True),
    "faulty_gpu": (0, True),
    "numerics": (1, True),
    "oom": (2, True),
    "corrupt_checkpoint": (3, True),
    "storage": (3, False),  # ENOSPC/EDQUOT/EROFS/EIO (exit 89): a restart meets the same disk
    "user_error": (4, False),
    "do_not_requeue": (5, False),
    "requeue": (6, False),
    "hang": (7, True),
    "crash": (8, True),
    "comm_timeout": (9, True),
    "comm_error": (10, True),
}

_CUDA_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|CUDA error: out of memory")
_HOST_OOM = re.compile(r"oom-kill|oom_kill|Out of memory: Killed process|MemoryError")
_GPU_FAULT = re.compile(r"uncorrectable ECC|ECC error|\bXid\b|GPU is lost|unspecified launch failure|"
                        r"cudaErrorECCUncorrectable|CUDA error: (?:uncorrectable|unknown error)|NVML.*(?:lost|failure)")
_COMM_TIMEOUT = re.compile(r"Watchdog caught collective operation timeout|collective operation timeout|"
                           r"Timed out waiting \d+ms|[Tt]imed out.*(?:recv|send|operation)|NCCL.*[Tt]imeout|"
                           r"DistStoreError.*[Tt]imeout|ProcessGroup\w*.*[Tt]imeout")
_COMM_ERROR = re.compile(r"Connection closed by peer|Connection reset by peer|ncclRemoteError|ncclSystemError|"
                         r"NCCL error|ncclInternalError|DistBackendError|Broken pipe|ECONNRESET")


@dataclass
class Failure:
    """One classified failure of an attempt."""

    cause: str
    """A key of CAUSES (or "hang", set by the watchdog)."""
    rank: int | None
    exit_code: int | None
    """The rank's exit status: >= 0 an exit code, < 0 killed by that signal (Popen convention)."""
    detail: str
    """One human line: what was seen."""
    checkpoint: str | None = None
    """For corrupt_checkpoint: the checkpoint directory that failed to load."""
    evidence: list[str] = field(default_factory=list)
    """The stderr lines that decided the cause."""
    node: str | None = None
    """The rank's node as SLURM names it (srun's task report or the rank's heartbeat), else its hostname."""
    observed_at: float | None = None
    """When the supervisor first saw this rank's failure (orders ranks that failed together)."""
    consequences: list[dict] = field(default_factory=list)
    """For the culprit: the other ranks that failed with it, as consequences ({rank, node, cause, status})."""

    @property
    def signal(self) -> int | None:
        """The signal that killed the rank (from -N or a shell's 128+N), None when it exited."""
        code = self.exit_code
        if code is None:
            return None
        if code < 0:
            return -code
        return code - 128 if 128 < code < 128 + 65 else None

    @property
    def retryable(self) -> bool:
        return CAUSES.get(self.cause, (99, True))[1]

    @property
    def priority(self) -> int:
        return CAUSES.get(self.cause, (99, True))[0]


def describe_status(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code > 128 and code - 128 < 65:  # shells and srun report a signal death as 128+N
        try:
            return f"exit code {code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"exit code {code}"


def _first(pattern: re.Pattern, lines: list[str]) -> str | None:
    for line in reversed(lines):
        if pattern.search(line):
            return line.strip()
    return None


def classify_rank(rank: int | None, code: int, stderr: list[str], oom_killed: bool = False,
                  load_failure: str | None = None) -> Failure:
    """Cause of one rank's non-zero exit ``code`` given its last stderr lines.

    ``load_failure``: the checkpoint directory this rank recorded in ``checkpoint_load_failures.jsonl``
    during this attempt (with exit 88), if any.
    """
    status = describe_status(code)
    if code == EXIT_CHECKPOINT_LOAD:
        if load_failure is None:
            return Failure("corrupt_checkpoint", rank, code, "a checkpoint failed to load (exit 88) but the rank "
                           "left no record naming it")
        return Failure("corrupt_checkpoint", rank, code, f"checkpoint {load_failure} failed to load (exit 88)",
                       checkpoint=load_failure)
    if code == EXIT_STORAGE:
        return Failure("storage", rank, code, "storage failure (exit 89): see storage_failures.jsonl")
    if code == EXIT_USER_ERROR:
        message = _first(re.compile(r"error"), stderr) or "(no message)"
        return Failure("user_error", rank, code, f"user error: {message}", evidence=[message])
    if code == EXIT_FAULTY_HARDWARE:
        return Failure("faulty_gpu", rank, code, "a detector blamed this rank's hardware (exit 86)")
    if code == EXIT_NUMERICS:
        return Failure("numerics", rank, code, "NaN/Inf or loss spike with policy stop (exit 87)")
    if code == EXIT_DO_NOT_REQUEUE:
        return Failure("do_not_requeue", rank, code, "the rank asked not to be restarted (exit 93)")
    if code == EXIT_REQUEUE:
        return Failure("requeue", rank, code, "the rank checkpointed and stopped to be requeued (exit 75)")
    for cause, pattern in (("faulty_gpu", _GPU_FAULT), ("oom", _CUDA_OOM)):
        line = _first(pattern, stderr)
        if line:
            return Failure(cause, rank, code, f"{status}: {line}", evidence=[line])
    if code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        line = _first(_HOST_OOM, stderr)
        if oom_killed or line:
            return Failure("oom", rank, code, f"{status} by the kernel's OOM killer (host memory)",
                           evidence=[line] if line else [])
        return Failure("crash", rank, code, f"{status} (OOM killer, an operator, or a fault drill)")
    line = _first(_HOST_OOM, stderr)
    if line:
        return Failure("oom", rank, code, f"{status}: {line}", evidence=[line])
    for cause, pattern in (("comm_timeout", _COMM_TIMEOUT), ("comm_error", _COMM_ERROR)):
        line = _first(pattern, stderr)
        if line:
            return Failure(cause, rank, code, f"{status}: {line}", evidence=[line])
    last = next((line.strip() for line in reversed(stderr) if line.strip()), "")
    return Failure("crash", rank, code, f"{status}" + (f": {last}" if last else ""), evidence=[last] if last else [])


def root_cause(failures: list[Failure]) -> Failure:
    """The culprit among ranks that failed together (most specific cause, then first seen, then lowest rank)."""
    assert failures, "root_cause needs at least one failure"
    return min(failures, key=lambda f: (f.priority, f.observed_at if f.observed_at is not None else float("inf"),
                                        f.rank if f.rank is not None else 1 << 30))


_COMM = ("comm_error", "comm_timeout")
_KILLED = (signal.SIGKILL, signal.SIGTERM)


def attribute(failures: list[Failure]) -> Failure:
    """The rank that failed first, with every other failed rank listed in its ``consequences``."""
    assert failures, "attribute needs at least one failure"
    candidates = [f for f in failures if f.cause not in _COMM] or failures
    first_seen = min((f.observed_at for f in failures if f.observed_at is not None), default=None)
    if first_seen is not None:
        # Killed by a signal after another rank's failure was seen: srun's --kill-on-bad-exit or the teardown.
        not_killed_later = [f for f in candidates if not (f.cause == "crash" and f.signal in _KILLED
                                                           and (f.observed_at or first_seen) > first_seen)]
        candidates = not_killed_later or candidates
    culprit = root_cause(candidates)
    culprit.consequences = [{"rank": f.rank, "node": f.node, "cause": f.cause, "status": describe_status(f.exit_code)}
                            for f in sorted(failures, key=lambda f: f.rank if f.rank is not None else -1)
                            if f is not culprit]
    return culprit
