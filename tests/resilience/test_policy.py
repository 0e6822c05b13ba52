"""The restart policy as a table: (how an attempt ended, history, config) -> action. No processes, milliseconds."""

from __future__ import annotations

import pytest

from megatron_align.config.resilience import SupervisorConfig
from megatron_align.resilience.supervisor.failures import Failure
from megatron_align.resilience.supervisor.policy import AttemptEnd, History, Nodes, decide

CFG = SupervisorConfig(max_restarts=3, max_restarts_per_hour=5, max_no_progress_restarts=2, backoff_s=10.0,
                       backoff_max_s=25.0)
NOW = 10_000.0


def _end(cause: str | None = "crash", node: str | None = None, **facts) -> AttemptEnd:
    failure = None if cause is None else Failure(cause, 0, 1, f"{cause} detail", node=node)
    return AttemptEnd(**{"failure": failure, "checkpoint_step_before": 4, "checkpoint_step": 6, "final_step": 10,
                         "train_steps": 10, **facts})


SLURM = Nodes(flagged=(), excluded=(), allocation=("n1", "n2", "n3"), needed=2)

# (case, attempt end, history) -> (restart?, exit code, outcome starts with, other expected action fields)
TABLE = [
    ("finished", _end(None, checkpoint_step=10), History(), (False, 0, "completed", {})),
    ("stop_at_step reached", _end(None, checkpoint_step=8, final_step=8), History(), (False, 0, "completed", {})),
    ("ranks exited 0 after a signal", _end(None, stop_requested=True), History(),
     (False, 75, "stopped to be requeued at step 6", {})),
    ("ranks exited 0 early", _end(None), History(), (False, 0, "ranks exited 0 at step 6 before train.steps=10", {})),
    ("signal during a failure", _end("crash", stop_requested=True), History(), (False, 75, "stopped to be requeued",
                                                                                 {})),
    ("rank exited 75", _end("requeue"), History(), (False, 75, "stopped to be requeued", {})),
    ("storage", _end("storage", storage_verdict="run_dir /r: no space left"), History(),
     (False, 89, "run_dir /r: no space left", {})),
    ("user error", _end("user_error"), History(), (False, 2, "not retried (user_error)", {})),
    ("exit 93", _end("do_not_requeue"), History(), (False, 93, "not retried (do_not_requeue)", {})),
    ("another run's checkpoint", _end("corrupt_checkpoint", checkpoint_is_ours=False), History(),
     (False, 2, "not retried: corrupt_checkpoint detail", {"quarantine": False})),
    ("our corrupt checkpoint", _end("corrupt_checkpoint", checkpoint_step=4), History(no_progress=2),
     (True, 0, "corrupt_checkpoint", {"quarantine": True, "no_progress": 0, "backoff_s": 10.0})),
    ("crash with progress", _end("crash"), History(attempt=1, no_progress=1),
     (True, 0, "crash", {"backoff_s": 10.0, "no_progress": 0})),
    ("hang without progress doubles the backoff", _end("hang", checkpoint_step=4), History(attempt=1, no_progress=1),
     (True, 0, "hang", {"backoff_s": 20.0, "no_progress": 2})),
    ("no-progress budget", _end("oom", checkpoint_step=4), History(attempt=0, no_progress=2, restart_times=()),
     (False, 93, "gave up after oom: 2 consecutive restarts committed no new checkpoint", {})),
    ("max_restarts", _end("crash"), History(attempt=3), (False, 93, "gave up after crash: restart budget spent", {})),
    ("per-hour budget", _end("crash"), History(attempt=1, restart_times=(NOW - 10,) * 5),
     (False, 93, "gave up after crash: 5 restarts within the last hour", {})),
    ("old restarts do not count", _end("crash"), History(attempt=1, restart_times=(NOW - 4000,) * 5),
     (True, 0, "crash", {})),
    ("corrupt checkpoint and budget spent: still set aside", _end("corrupt_checkpoint"), History(attempt=3),
     (False, 93, "gave up after corrupt_checkpoint", {"quarantine": True})),
    ("lost node outside SLURM: noted, restart here", _end("node_lost", node="h1"), History(),
     (True, 0, "node_lost", {"flag_node": "h1", "exclude": ("h1",)})),
    ("GPU fault under SLURM: exclude its node", _end("faulty_gpu", node="n2", nodes=SLURM), History(),
     (True, 0, "faulty_gpu", {"flag_node": "n2", "exclude": ("n2",)})),
    ("GPU fault a detector named: its nodes, not the culprit's",
     _end("faulty_gpu", node="n2", nodes=Nodes(("n3",), (), ("n1", "n2", "n3"), 2)), History(),
     (True, 0, "faulty_gpu", {"flag_node": None, "exclude": ("n3",)})),
    ("crash: no node flagged", _end("crash", node="n2", nodes=SLURM), History(), (True, 0, "crash", {"exclude": ()})),
    ("too few nodes, requeueable", _end("node_lost", node="n2", nodes=Nodes((), ("n1",), ("n1", "n2", "n3"), 2,
                                                                             True, ("p9",))),
     History(), (False, 75, "requeued excluding n1, n2, p9", {"requeue_excluding": ("n1", "n2", "p9")})),
    ("too few nodes, not requeueable", _end("node_lost", node="n2", nodes=Nodes((), ("n1",), ("n1", "n2", "n3"), 2)),
     History(), (False, 93, "not enough nodes after excluding n1, n2", {"exclude": ("n2",)})),
    ("flagged node outside the allocation is ignored", _end("crash", nodes=Nodes(("x9",), (), ("n1", "n2"), 2)),
     History(), (True, 0, "crash", {"exclude": ()})),
]


@pytest.mark.parametrize("case,end,history,expected", TABLE, ids=[row[0] for row in TABLE])
def test_policy_table(case, end, history, expected):
    restart, code, outcome, fields = expected
    action = decide(end, history, CFG, NOW)
    assert (action.restart, action.exit_code) == (restart, code), (case, action)
    assert action.outcome.startswith(outcome), (case, action.outcome)
    for key, value in fields.items():
        assert getattr(action, key) == value, (case, key, action)


def test_history_after_restart_keeps_the_last_hour():
    action = decide(_end("hang", checkpoint_step=4), History(attempt=1, no_progress=1), CFG, NOW)
    history = History(attempt=1, restart_times=(NOW - 4000, NOW - 5), no_progress=1).after_restart(action, NOW)
    assert history == History(attempt=2, restart_times=(NOW - 5, NOW), no_progress=2)
