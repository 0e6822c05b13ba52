"""The restart decision as a pure function: (how the attempt ended, the history, the config) -> what to do.

The supervisor gathers facts (the classified failure, checkpoint steps, the exclude lists, the allocation) and
applies the :class:`Action` this module returns (set a checkpoint aside, exclude nodes, back off, restart or
exit with a code); the decision itself does no I/O, so it is tested as a table in milliseconds. In order:

==============================================  ============================================================
how the attempt ended                           action
==============================================  ============================================================
every rank exited 0, final step reached         stop, exit 0 ("completed")
every rank exited 0 after a stop signal         stop, exit 75 (requeue)
every rank exited 0 early (a requested stop)    stop, exit 0
a stop signal reached the supervisor, or a      stop, exit 75 ("stopped to be requeued")
rank exited 75
storage (exit 89)                               stop, exit 89 with the storage verdict: a restart meets the
                                                same disk
user error (exit 2)                             stop, exit 2 (not retried)
another non-retryable cause (exit 93)           stop, exit 93 (not retried)
corrupt checkpoint not of this run              stop, exit 2 (never touch another run's checkpoint)
corrupt checkpoint of this run                  quarantine it (``iter_N.corrupt-<time>``), then as below
retry budget spent (max_restarts,               stop, exit 93 ("gave up")
max_restarts_per_hour, max_no_progress)
nodes flagged (detectors' exclude_nodes.txt,    exclude them and restart; outside SLURM restart here
a lost node, an unattributed GPU fault)         anyway; too few nodes left: requeue excluding them
                                                (exit 75) or, when not requeueable, exit 93
anything else (crash, hang, OOM, numerics,      restart after a backoff of backoff_s x 2^(restarts without
comm error, ...)                                progress - 1), at most backoff_max_s
==============================================  ============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_align.config.resilience import SupervisorConfig
from megatron_align.resilience.protocol.exit_codes import (
    EXIT_DO_NOT_REQUEUE,
    EXIT_OK,
    EXIT_REQUEUE,
    EXIT_STORAGE,
    EXIT_USER_ERROR,
)
from megatron_align.resilience.supervisor.failures import Failure

HOUR_S = 3600.0


@dataclass(frozen=True)
class Nodes:
    """Where the run may be placed: the exclude lists and (under SLURM) the allocation."""

    flagged: tuple[str, ...] = ()
    """Nodes in ``<run_dir>/exclude_nodes.txt`` now (the detectors' verdicts and earlier attempts')."""
    excluded: tuple[str, ...] = ()
    """Nodes this launch already leaves out of its attempts."""
    allocation: tuple[str, ...] | None = None
    """The SLURM allocation's nodes; None outside SLURM (exclusion is then only noted)."""
    needed: int = 1
    """Nodes an attempt needs (world size / tasks per node)."""
    requeueable: bool = False
    """``requeue=auto`` and the batch job was submitted with ``--requeue``."""
    preflight: tuple[str, ...] = ()
    """Nodes of ``resilience.supervisor.exclude_file`` (kept out of a requeued job too)."""


@dataclass(frozen=True)
class AttemptEnd:
    """The facts about one ended attempt the decision needs (gathered by the supervisor)."""

    failure: Failure | None
    """None: every rank exited 0."""
    stop_requested: bool = False
    """SIGUSR1/SIGTERM/SIGINT reached the supervisor."""
    checkpoint_step_before: int = 0
    """Newest complete checkpoint's step when the attempt started."""
    checkpoint_step: int = 0
    """... and now."""
    final_step: int = 0
    """The step the run ends at: min(train.steps, train.stop_at_step)."""
    train_steps: int = 0
    checkpoint_is_ours: bool = True
    """For a corrupt checkpoint: it is one of this run's ``iter_*`` directories (so it may be set aside)."""
    storage_verdict: str = ""
    """For a storage failure: the one message (where, free space, intact checkpoint, what to do)."""
    nodes: Nodes = field(default_factory=Nodes)


@dataclass(frozen=True)
class History:
    """What earlier attempts of this launch did."""

    attempt: int = 0
    """This attempt's number (0 = the first start)."""
    restart_times: tuple[float, ...] = ()
    """When earlier restarts started."""
    no_progress: int = 0
    """Consecutive failed attempts that committed no newer checkpoint, before this one."""

    def after_restart(self, action: Action, now: float) -> History:
        return History(self.attempt + 1, (*self.restarts_within_hour(now), now), action.no_progress)

    def restarts_within_hour(self, now: float) -> tuple[float, ...]:
        return tuple(t for t in self.restart_times if now - t < HOUR_S)


@dataclass(frozen=True)
class Action:
    """What the supervisor does next. ``restart`` False: exit with ``exit_code``."""

    restart: bool
    exit_code: int
    outcome: str
    """The run summary's outcome line (why it stopped), or the cause it restarts after."""
    backoff_s: float = 0.0
    quarantine: bool = False
    """Set the failed checkpoint aside (``iter_N.corrupt-<time>``, never deleted) before going on."""
    flag_node: str | None = None
    """A node to add to ``exclude_nodes.txt`` (a lost node, or a GPU fault no detector named)."""
    exclude: tuple[str, ...] = ()
    """Nodes to leave out of every later attempt of this launch."""
    requeue_excluding: tuple[str, ...] = ()
    """Before exiting 75: ``scontrol update ExcNodeList=`` these, so the requeued job avoids them."""
    no_progress: int = 0

    @property
    def kind(self) -> str:
        """restart | stop: the word restarts.jsonl records."""
        return "restart" if self.restart else "stop"


def _stop(code: int, outcome: str, **kwargs) -> Action:
    return Action(False, code, outcome, **kwargs)


def decide(end: AttemptEnd, history: History, cfg: SupervisorConfig, now: float) -> Action:
    """What to do after an attempt ended (the table in the module docstring, top to bottom)."""
    failure = end.failure
    if failure is None:
        step = end.checkpoint_step
        if step >= end.final_step:
            return _stop(EXIT_OK, "completed")
        if end.stop_requested:
            return _stop(EXIT_REQUEUE, f"stopped to be requeued at step {step}")
        return _stop(EXIT_OK, f"ranks exited 0 at step {step} before train.steps={end.train_steps} (a requested stop)")
    if end.stop_requested or failure.cause == "requeue":
        return _stop(EXIT_REQUEUE, "stopped to be requeued")
    if failure.cause == "storage":
        return _stop(EXIT_STORAGE, end.storage_verdict)
    if not failure.retryable:
        code = EXIT_USER_ERROR if failure.cause == "user_error" else EXIT_DO_NOT_REQUEUE
        return _stop(code, f"not retried ({failure.cause}): {failure.detail}")
    corrupt = failure.cause == "corrupt_checkpoint"
    if corrupt and not end.checkpoint_is_ours:
        return _stop(EXIT_USER_ERROR, f"not retried: {failure.detail}")
    progressed = end.checkpoint_step > end.checkpoint_step_before or corrupt
    no_progress = 0 if progressed else history.no_progress + 1
    spent = budget_spent(cfg, history.attempt, len(history.restarts_within_hour(now)), no_progress)
    if spent:
        return _stop(EXIT_DO_NOT_REQUEUE, f"gave up after {failure.cause}: {spent}", quarantine=corrupt)
    placement = _placement(failure, end.nodes)
    if placement is not None:
        return Action(**{**placement, "quarantine": corrupt, "no_progress": no_progress})
    flag_node, exclude = _nodes_to_exclude(failure, end.nodes)
    backoff = min(cfg.backoff_max_s, cfg.backoff_s * 2 ** max(0, no_progress - 1))
    return Action(True, EXIT_OK, failure.cause, backoff, quarantine=corrupt, flag_node=flag_node, exclude=exclude,
                  no_progress=no_progress)


def budget_spent(cfg: SupervisorConfig, attempt: int, in_last_hour: int, no_progress: int) -> str | None:
    """Why no restart is allowed any more, or None."""
    if attempt >= cfg.max_restarts:
        return f"restart budget spent (resilience.supervisor.max_restarts={cfg.max_restarts})"
    if in_last_hour >= cfg.max_restarts_per_hour:
        return f"{in_last_hour} restarts within the last hour (max_restarts_per_hour={cfg.max_restarts_per_hour})"
    if no_progress > cfg.max_no_progress_restarts:
        return (f"{no_progress - 1} consecutive restarts committed no new checkpoint "
                f"(max_no_progress_restarts={cfg.max_no_progress_restarts})")
    return None


def _nodes_to_exclude(failure: Failure, nodes: Nodes) -> tuple[str | None, tuple[str, ...]]:
    """(node to add to exclude_nodes.txt, nodes newly left out of the attempts)."""
    detector_named = [n for n in nodes.flagged if n not in nodes.excluded]
    flag = failure.node if failure.node and (
        failure.cause == "node_lost" or (failure.cause == "faulty_gpu" and not detector_named)) else None
    flagged = list(nodes.flagged) + ([flag] if flag and flag not in nodes.flagged else [])
    new = [n for n in flagged if n not in nodes.excluded]
    if nodes.allocation is not None:
        new = [n for n in new if n in nodes.allocation]
    return flag, tuple(new)


def _placement(failure: Failure, nodes: Nodes) -> dict | None:
    """A stop (as Action fields) when too few nodes are left after the exclusion, else None (restart)."""
    flag, new = _nodes_to_exclude(failure, nodes)
    if nodes.allocation is None or not new:
        return None
    excluded = [*nodes.excluded, *new]
    left = [n for n in nodes.allocation if n not in excluded]
    if len(left) >= nodes.needed:
        return None
    common = {"restart": False, "flag_node": flag, "exclude": new}
    if nodes.requeueable:
        # Every node this run ever flagged, not only this allocation's: the requeued job may be placed anywhere.
        flagged = [*nodes.flagged, *([flag] if flag else [])]
        every = tuple(dict.fromkeys([*excluded, *flagged, *nodes.preflight]))
        return {**common, "exit_code": EXIT_REQUEUE, "outcome": f"requeued excluding {', '.join(every)}",
                "requeue_excluding": every}
    return {**common, "exit_code": EXIT_DO_NOT_REQUEUE,
            "outcome": f"not enough nodes after excluding {', '.join(excluded)}: resubmit with "
                       f"sbatch --exclude={','.join(excluded)}"}
