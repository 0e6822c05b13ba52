"""Fault injection for tests and drills: make a rank fail the way real hardware does.

Two sources, same grammar. ``resilience.inject`` in the config and the
``MEGATRON_ALIGN_FAULT`` environment variable (comma-separated) hold items
``kind[:arg]@step[@rank]`` (``kind@step[@rank][:arg]`` is accepted too); no rank = every rank:

=========================  ===============================================================
``kill@S[@R]``             SIGKILL the rank at the start of step S (no cleanup at all)
``hang@S[@R]``             sleep forever at the start of step S (for the hang watchdog)
``slow:F@S[@R]``           from step S, every model forward and optimizer step takes F x
                           as long: inside the section the rank adds (F-1) x its measured
                           time (GPU: sleeps after synchronising; CPU: burns CPU seconds),
                           so the section timings see a genuinely slow rank
``nan@S[@R]``              step S's model output is multiplied by NaN on the rank: the NaN
                           flows through the real path (loss -> all-reduce -> ``on_loss``
                           -> gradients), as a numerics fault would
``spike:F@S[@R]``          step S's model output is multiplied by F (a loss spike, same path)
``nan_grad@S[@R]``         step S's gradient of the first parameter becomes NaN in backward
                           (finite loss, non-finite grad norm: the update-already-applied case)
``sdc@S[@R]``              from step S, the SDC check's GEMM result has one mantissa bit
                           flipped on the rank (a silently corrupting GPU)
``corrupt_checkpoint@S``   the first checkpoint committed at or after step S gets garbage
                           written over the start and the middle of its shard files
                           (sizes kept, marker kept: it still *looks* complete)
``truncate_checkpoint@S``  ... gets its shard files cut to half their length
``bitflip_checkpoint@S``   ... gets one bit flipped in the middle of its largest shard file
                           (inside tensor bytes: it still loads; only the checksums see it)
``disk_full@S[@R]``        from step S the rank sees the checkpoint filesystem as full (free
                           space 0; nothing is really filled): the next save stops the run
                           with the storage verdict before writing (exit 89)
=========================  ===============================================================

For the checkpoint faults a rank R damages only its own ``__R_*.distcp`` files; without a
rank, rank 0 damages every shard file and ``common.pt``.

**Each injection fires at most once per run_dir**: the rank records it in
``<run_dir>/faults_fired.jsonl`` before acting, and a restarted job (same config, same
environment) skips recorded ones. Without this a ``kill@5`` would kill every restart that
resumes before step 5 and no drill could ever complete. ``slow`` and ``sdc`` persist for the
rest of the process that first applied them (the "faulty GPU" is gone after a restart).

Items whose name contains a dot are *fault points* in the code (``point@step[@rank]``):
``fault_point(point, step)`` SIGKILLs the process when it reaches a matching point, e.g.
``checkpoint.before_commit@4`` (used by the checkpoint commit-protocol tests). They do not
have the fire-once rule.

This module is the grammar, the plan and the checkpoint damage; it imports neither torch nor
the trainer, so the config validates ``resilience.inject`` with it and the supervisor shares its
names. The trainer callback that applies a plan is :mod:`megatron_align.resilience.inrank.inject`.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

from megatron_align.errors import ConfigError, UserError
from megatron_align.resilience.protocol.run_files import FAULTS_FIRED_FILE, append_record, read_records

log = logging.getLogger(__name__)

ENV_VAR = "MEGATRON_ALIGN_FAULT"
# kind -> whether it takes ":arg"
KINDS: dict[str, bool] = {"kill": False, "hang": False, "slow": True, "nan": False, "spike": True, "nan_grad": False,
                          "sdc": False,
                          "corrupt_checkpoint": False, "truncate_checkpoint": False, "bitflip_checkpoint": False,
                          "disk_full": False}
_FORMAT = (
    "kind[:arg]@step[@rank], e.g. kill@5, hang@5@1, slow:3@10@1, nan@7, spike:20@7, sdc@4@1, corrupt_checkpoint@4, "
    "bitflip_checkpoint@4, disk_full@6"
)


# -- fault points (SIGKILL at a named place in the code) ---------------------------------------
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
    spec = os.environ.get(ENV_VAR, "")
    if not spec:
        return
    rank = int(os.environ.get("RANK", "0"))
    if any(_matches(item, point, step, rank) for item in spec.split(",")):
        os.kill(os.getpid(), signal.SIGKILL)


# -- injection specs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None
    """None = every rank (checkpoint faults: rank 0 acts for all)."""
    arg: float | None
    text: str
    """The item as written (identifies it in faults_fired.jsonl)."""

    def on_rank(self, rank: int) -> bool:
        return self.rank is None or self.rank == rank


def _int(value: str, what: str, where: str, text: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{where}={text!r}: {what} {value!r} is not an integer (format {_FORMAT})") from None
    if number < minimum:
        raise ConfigError(f"{where}={text!r}: {what} must be >= {minimum}, got {number}")
    return number


def parse_fault(text: str, where: str = "resilience.inject") -> Fault:
    """Parse one item; a ConfigError names ``where`` (the config key or env var) and the expected format."""
    item = text.strip()
    if not item:
        raise ConfigError(f"{where}: empty fault item (format {_FORMAT})")
    parts = item.split("@")
    arg_text = None
    if ":" in parts[0]:
        parts[0], arg_text = parts[0].split(":", 1)
    if len(parts) > 1 and ":" in parts[-1]:
        if arg_text is not None:
            raise ConfigError(f"{where}={text!r}: ':arg' given twice (format {_FORMAT})")
        parts[-1], arg_text = parts[-1].split(":", 1)
    kind = parts[0]
    if kind not in KINDS:
        raise ConfigError(f"{where}={text!r}: unknown fault kind {kind!r}; expected one of "
                          f"{', '.join(k + (':FACTOR' if KINDS[k] else '') for k in KINDS)} (format {_FORMAT})")
    if len(parts) < 2 or not parts[1]:
        raise ConfigError(f"{where}={text!r}: missing @step (format {_FORMAT})")
    if len(parts) > 3:
        raise ConfigError(f"{where}={text!r}: too many '@' parts (format {_FORMAT})")
    step = _int(parts[1], "step", where, text, 1)
    rank = _int(parts[2], "rank", where, text, 0) if len(parts) == 3 and parts[2] else None
    arg = None
    if KINDS[kind]:
        if arg_text is None:
            raise ConfigError(f"{where}={text!r}: {kind} needs a factor, e.g. {kind}:3@{step}")
        try:
            arg = float(arg_text)
        except ValueError:
            raise ConfigError(f"{where}={text!r}: factor {arg_text!r} is not a number") from None
        if not arg > 1.0:
            raise ConfigError(f"{where}={text!r}: {kind} factor must be > 1, got {arg}")
    elif arg_text is not None:
        raise ConfigError(f"{where}={text!r}: {kind} takes no ':arg'")
    return Fault(kind, step, rank, arg, item)


def parse_faults(items: list[str], where: str = "resilience.inject") -> list[Fault]:
    return [parse_fault(item, f"{where}[{i}]") for i, item in enumerate(items)]


def faults_from_env(environ=os.environ) -> list[Fault]:
    """Injection items of ``MEGATRON_ALIGN_FAULT`` (fault points, which contain a dot, are left to fault_point)."""
    items = [x.strip() for x in environ.get(ENV_VAR, "").split(",") if x.strip()]
    try:
        return [parse_fault(x, ENV_VAR) for x in items if "." not in x.split("@")[0]]
    except ConfigError as err:
        raise UserError(str(err)) from None


# -- the plan: which faults fire where, at most once per run_dir ---------------------------------
class FaultPlan:
    """The faults of one run (config + environment) and the fire-once bookkeeping."""

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        self.rank = 0
        self.run_dir: str | None = None
        self._fired_before: set[str] = set()
        self._fired_now: set[str] = set()

    def start(self, run_dir: str, rank: int, world_size: int) -> None:
        for fault in self.faults:
            if fault.rank is not None and fault.rank >= world_size:
                raise UserError(f"fault {fault.text!r}: rank {fault.rank} does not exist (world size {world_size})")
        self.run_dir, self.rank = run_dir, rank
        self._fired_before = {str(r["key"]) for r in read_records(run_dir, FAULTS_FIRED_FILE) if "key" in r}

    def _key(self, fault: Fault) -> str:
        return f"{fault.text}#rank{self.rank}"

    def fire(self, kind: str, step: int, persistent: bool = False) -> Fault | None:
        """The fault of ``kind`` this rank must apply at ``step`` (``persistent``: at or after its step), else None.

        The first call that returns a fault records it in faults_fired.jsonl (before the caller acts).
        """
        for fault in self.faults:
            if fault.kind != kind or not fault.on_rank(self.rank):
                continue
            due = step >= fault.step if persistent else step == fault.step
            key = self._key(fault)
            if not due or key in self._fired_before:
                continue
            if key not in self._fired_now:
                self._record(fault, key, step)
            return fault
        return None

    def _record(self, fault: Fault, key: str, step: int) -> None:
        self._fired_now.add(key)
        log.warning("fault injection: %s fires on rank %d at step %d", fault.text, self.rank, step)
        if self.run_dir is not None:
            append_record(self.run_dir, FAULTS_FIRED_FILE, {"key": key, "fault": fault.text, "kind": fault.kind,
                                                            "rank": self.rank, "step": step, "pid": os.getpid()})

    def pending(self, kind: str) -> list[Fault]:
        """Faults of ``kind`` for this rank that have not fired in this run_dir yet."""
        return [f for f in self.faults if f.kind == kind and f.on_rank(self.rank)
                and self._key(f) not in self._fired_before | self._fired_now]


# -- checkpoint damage ---------------------------------------------------------------------------
def damage_checkpoint(path: str, mode: str, rank: int | None = None) -> list[str]:
    """Corrupt or truncate the shard files of checkpoint dir ``path``; returns the damaged files.

    ``corrupt``: seeded garbage over the first 4 KiB and a 4 KiB block in the middle (headers
    and payload; sizes unchanged). ``truncate``: cut to half the length. ``rank`` limits it to that
    rank's ``__R_*.distcp`` files; None = all shard files and ``common.pt``.
    """
    if mode not in ("corrupt", "truncate", "bitflip"):
        raise ValueError(f"mode {mode!r}")
    names = sorted(os.listdir(path))
    if rank is None:
        targets = [n for n in names if n.endswith(".distcp") or n == "common.pt"]
    else:
        targets = [n for n in names if n.startswith(f"__{rank}_") and n.endswith(".distcp")]
    if mode == "bitflip":  # one bit, mid-file of the largest shard: tensor payload, not a pickle header
        shards = [n for n in targets if n.endswith(".distcp")]
        targets = [max(shards, key=lambda n: os.path.getsize(os.path.join(path, n)))] if shards else []
    damaged = []
    for name in targets:
        file = os.path.join(path, name)
        size = os.path.getsize(file)
        if size == 0:
            continue
        with open(file, "r+b") as f:
            if mode == "truncate":
                f.truncate(size // 2)
            elif mode == "bitflip":
                f.seek(size // 2)
                byte = f.read(1)[0]
                f.seek(size // 2)
                f.write(bytes([byte ^ 0x04]))
            else:
                block = min(4096, max(1, size // 4))
                garbage = bytes((i * 131 + 17 + size) % 251 for i in range(block))
                for offset in (0, max(0, size // 2 - block // 2)):
                    f.seek(offset)
                    f.write(garbage)
            f.flush()
            os.fsync(f.fileno())
        damaged.append(file)
    return damaged
