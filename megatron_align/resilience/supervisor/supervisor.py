"""The restart manager around a training run (`megatron-align launch`): one attempt after another.

What: starts the ranks of ``megatron-align train`` (local processes, or one ``srun`` step inside
a SLURM allocation), watches their exit codes and heartbeat files, and when the job fails
classifies why (:mod:`.failures`), tears everything down, and starts it again; the trainer
resumes by itself from the newest complete checkpoint in ``run_dir``. It stops with a summary
when the run completes, when the failure is not worth retrying (a user error, exit 93), or when
the retry budget is spent, and it prints and writes the run's goodput.

The restart protocol, one attempt after another:

1. remove the previous attempt's heartbeat files; start the ranks with ``MEGATRON_ALIGN_SUPERVISED=1``
   and ``MEGATRON_ALIGN_ATTEMPT=k`` (restarted attempts without ``MEGATRON_ALIGN_FAULT``, so a drill's
   one-shot fault does not fire again; ``resilience.supervisor.clear_fault_injection=false`` keeps it);
2. watch: a non-zero exit of any rank ends the attempt; so does a hang (:mod:`.watchdog`): then
   SIGUSR2 makes every rank dump its Python stacks into ``run_dir/stacks/`` before the teardown;
3. tear down the rest (SIGTERM, ``term_grace_s``, SIGKILL) so no rank waits in a collective;
4. act on the cause as the pure policy decides (:mod:`.policy` has the table): a corrupt *complete*
   checkpoint that failed to load is renamed to ``iter_N.corrupt-<time>`` (never deleted) so the next
   attempt resumes from the one before;
   nodes in ``run_dir/exclude_nodes.txt`` (and the node of a GPU fault) are ``--exclude``-d under
   SLURM; a user error or exit 93 stops; everything else restarts after an exponential backoff,
   within ``max_restarts``, ``max_restarts_per_hour`` and ``max_no_progress_restarts``;
5. append one line per failure to ``run_dir/restarts.jsonl`` (time, cause, rank, node, exit code,
   checkpoint used, steps lost, action): :meth:`Supervisor._record`, the one place an attempt's end is recorded.

SIGUSR1/SIGTERM to the supervisor (SLURM ``--signal=B:USR1@N`` before the time limit) ask the
ranks to checkpoint and stop: local ranks get the signal; srun steps get ``run_dir/stop_request``
(read by the heartbeat callback; a signal through srun would also hit the ranks' helper processes,
and is only the fallback after half of ``stop_grace_s``); the supervisor then exits 75 and, inside a
batch job submitted with ``--requeue``, runs ``scontrol requeue`` (``requeue=never`` turns it off).

A storage failure of a rank (exit 89: ENOSPC, EDQUOT, EROFS, EIO, or a checkpoint that would not fit)
is never retried: the supervisor prints one message (where, free space, the intact checkpoint, what to
do) and exits 89 itself, without ``scontrol requeue`` (a requeued job would meet the same disk; freeing
space needs a person). Its own writes (supervisor.log, restarts.jsonl, goodput.json, stop_request) fall
back to stderr when the run dir refuses them.

Exit codes: 0 completed, 2 user error (or run_dir held by another live run: :mod:`megatron_align.training.run_lock`),
75 stopped to be requeued, 89 storage, 93 gave up (do not requeue).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from megatron_align.config import RootConfig
from megatron_align.corpus.indexed import check_data_files
from megatron_align.errors import UserError
from megatron_align.resilience import flight_recorder
from megatron_align.resilience.alerts import Alerter, SupervisorAlerts
from megatron_align.resilience.protocol.exclude_nodes import add_exclude_nodes, read_exclude_file, read_exclude_nodes
from megatron_align.resilience.protocol.exit_codes import EXIT_REQUEUE
from megatron_align.resilience.protocol.faults import ENV_VAR as FAULT_ENV
from megatron_align.resilience.protocol.heartbeats import (
    ATTEMPT_ENV,
    STOP_REQUEST_FILE,
    SUPERVISED_ENV,
    read_heartbeats,
    stacks_path,
)
from megatron_align.resilience.protocol.rank_exit import EXITS_DIR
from megatron_align.resilience.protocol.run_files import (
    FAULTS_FIRED_FILE,
    HEALTH_FILE,
    RESTARTS_FILE,
    STRAGGLERS_FILE,
    append_record,
    checkpoint_load_failures_size,
    read_checkpoint_load_failures,
    read_records,
)
from megatron_align.resilience.protocol.storage import storage_verdict
from megatron_align.resilience.supervisor.failures import Failure, attribute, classify_rank, describe_status
from megatron_align.resilience.supervisor.jobs import (
    Job,
    LocalJob,
    SrunJob,
    allocation_nodes,
    resolve_ipv4,
    scontrol,
    submitted_with_requeue,
    tasks_per_node_of_allocation,
)
from megatron_align.resilience.supervisor.policy import Action, AttemptEnd, History, Nodes, decide
from megatron_align.resilience.supervisor.run_report import RunReport, last_logged_step
from megatron_align.resilience.supervisor.watchdog import HangWatchdog
from megatron_align.training import run_lock
from megatron_align.training.checkpoint_files import resolve_checkpoint

_STEP_RE = re.compile(r"iter_(\d+)$")


def newest_checkpoint(ckpt_dir: str) -> tuple[str | None, int]:
    """(path, step) of the checkpoint the trainer will resume from (the trainer's own rule, torch-free)."""
    path = resolve_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    return (path, int(os.path.basename(path)[len("iter_"):])) if path else (None, 0)


@dataclass
class Outcome:
    """How one attempt ended: every rank exited 0, or a failure (exit, hang, stop timeout)."""

    failure: Failure | None
    failed_at: float


class Supervisor:
    def __init__(self, config: RootConfig, config_path: str, overrides: list[str], environ=os.environ,
                 lock_lost: Callable[[], str | None] | None = None) -> None:
        self.config = config
        self.lock_lost = lock_lost
        """Polled while ranks run: the reason this launch lost its run lock (its ranks are then killed)."""
        self.cfg = config.resilience.supervisor
        self.world_size = config.parallel.world_size
        self.run_dir = config.run_dir
        self.ckpt_dir = config.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        self.argv = ["train", config_path, *overrides]
        self.environ = dict(environ)
        self.slurm = "SLURM_JOB_ID" in environ and "SLURM_STEP_ID" not in environ
        self.watchdog = HangWatchdog(self.cfg, self.world_size)
        self.report = RunReport(config, self._checkpoint()[1])
        self.stop_signal: int | None = None
        self.signals_received = 0
        self.last_beats: dict[int, dict] = {}
        self._log_failed = False
        # Nodes left out of every attempt: this run's own list (kept across attempts and requeues) and the
        # preflight's exclude file (resilience.supervisor.exclude_file).
        self.excluded: list[str] = []
        if self.slurm:
            flagged = read_exclude_nodes(self.run_dir) + read_exclude_file(self.cfg.exclude_file)
            allocation = allocation_nodes(self.environ)
            self.excluded = [n for n in dict.fromkeys(flagged) if n in allocation]
        self.report.excluded = self.excluded
        self.alerts = SupervisorAlerts(Alerter(self.run_dir, "supervisor", config.resilience.alerts, environ),
                                       self.excluded)

    # -- small helpers ----------------------------------------------------------------------------
    def say(self, message: str) -> None:
        """stderr, and supervisor.log when the run dir takes it (a full disk must not kill the supervisor)."""
        line = f"megatron-align launch: {message}"
        print(line, file=sys.stderr, flush=True)
        try:
            with open(os.path.join(self.run_dir, "supervisor.log"), "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self._log_failed = False
        except OSError as err:
            if not self._log_failed:
                print(f"megatron-align launch: cannot write {os.path.join(self.run_dir, 'supervisor.log')} ({err}); "
                      "reporting on stderr only", file=sys.stderr, flush=True)
            self._log_failed = True

    def _checkpoint(self) -> tuple[str | None, int]:
        """(path, step) of the checkpoint a new attempt would resume from; step 0 when there is none."""
        return newest_checkpoint(self.ckpt_dir)

    def _on_signal(self, signum, _frame) -> None:
        self.signals_received += 1
        if self.stop_signal is None:
            self.stop_signal = signum

    def _tasks_per_node(self) -> int:
        return self.cfg.tasks_per_node or tasks_per_node_of_allocation(self.environ)

    def _nodes_needed(self) -> int:
        tpn = self._tasks_per_node()
        return -(-self.world_size // tpn) if tpn else 1

    @functools.cached_property
    def _requeueable(self) -> bool:
        """Inside a batch job submitted with ``--requeue`` (asked once: it does not change)."""
        return submitted_with_requeue(self.environ["SLURM_JOB_ID"])

    # -- the restart loop: policy + attempt -------------------------------------------------------
    def run(self) -> int:
        os.makedirs(self.run_dir, exist_ok=True)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
        history = History()
        self.say(f"supervising {self.world_size} rank(s) of {' '.join(self.argv)} "
                 f"({'srun in SLURM job ' + self.environ['SLURM_JOB_ID'] if self.slurm else 'local processes'})")
        try:
            while True:
                checkpoint_before = self._checkpoint()[1]
                job = self._start(history.attempt)
                self.report.attempt_started(history.attempt)
                outcome = self._watch(job)
                failure = outcome.failure
                end = self._facts(failure, checkpoint_before)
                action = decide(end, history, self.cfg, time.time())
                if failure is not None:
                    self._act(end, failure, action)
                    self._record(history.attempt, failure, action)
                if failure is None or not action.restart:
                    code, outcome_text = action.exit_code, action.outcome
                    break
                self.report.failure(history.attempt, failure.cause, outcome.failed_at)
                if self._sleep(action.backoff_s):
                    code, outcome_text = EXIT_REQUEUE, "stopped to be requeued (signal during backoff)"
                    break
                history = history.after_restart(action, time.time())
        finally:
            self._clear_stop_request()
            for s, handler in handlers.items():
                signal.signal(s, handler)
        summary = self.report.finish(code, outcome_text, self._checkpoint()[1])
        print(summary, flush=True)
        self.alerts.alerter.drain(timeout_s=10.0)  # the give-up alert goes out before the job ends
        if code == EXIT_REQUEUE:
            self._requeue()
        return code

    def _facts(self, failure: Failure | None, checkpoint_before: int) -> AttemptEnd:
        """What the policy needs to know about the attempt that just ended (read here; decided in policy)."""
        t = self.config.train
        path, step = self._checkpoint()
        end = AttemptEnd(failure, stop_requested=self.stop_signal is not None, checkpoint_step_before=checkpoint_before,
                         checkpoint_step=step, final_step=min(t.steps, t.stop_at_step or t.steps), train_steps=t.steps)
        if failure is None:
            return end
        verdict = storage_verdict(self.run_dir, self.attempt_started, path) if failure.cause == "storage" else ""
        ours = failure.cause != "corrupt_checkpoint" or self._is_ours(failure.checkpoint)
        flagged = tuple(read_exclude_nodes(self.run_dir))
        if not self.slurm:
            nodes = Nodes(flagged, tuple(self.excluded))
        else:
            nodes = Nodes(flagged, tuple(self.excluded), tuple(allocation_nodes(self.environ)), self._nodes_needed(),
                          self.cfg.requeue == "auto" and self._requeueable,
                          tuple(read_exclude_file(self.cfg.exclude_file)))
        return dataclasses.replace(end, checkpoint_is_ours=ours, storage_verdict=verdict, nodes=nodes)

    def _act(self, end: AttemptEnd, failure: Failure, action: Action) -> None:
        """Carry out what the policy decided about the run dir and the nodes (before the attempt is recorded)."""
        if failure.cause == "corrupt_checkpoint" and not end.checkpoint_is_ours:
            self.say(f"{failure.checkpoint} is not a checkpoint of this run's {self.ckpt_dir}: not touching it")
        if action.quarantine:
            self._quarantine(failure)
        if action.flag_node:
            add_exclude_nodes(self.run_dir, [action.flag_node])
        if action.exclude:
            self.excluded.extend(action.exclude)
            if not self.slurm:
                self.say(f"nodes flagged for exclusion: {', '.join(action.exclude)} "
                         "(not in a SLURM allocation: restarting here anyway)")
            else:
                allocation = end.nodes.allocation or ()
                left = [n for n in allocation if n not in self.excluded]
                self.say(f"excluding nodes {', '.join(self.excluded)}: {len(left)} of {len(allocation)} nodes left, "
                         f"{end.nodes.needed} needed")
        if action.requeue_excluding:
            scontrol("update", f"JobId={self.environ['SLURM_JOB_ID']}",
                      f"ExcNodeList={','.join(action.requeue_excluding)}")

    def _record(self, attempt: int, failure: Failure, action: Action) -> None:
        """The one record of how a failed attempt ended: restarts.jsonl (stderr when refused) and the log line."""
        path, step = self._checkpoint()
        # The ranks are gone: read their final heartbeats. A SIGKILLed rank may die before its writer thread
        # flushes the last step, so rank 0's metrics log counts too.
        self._read_beats()
        beats = [int(b.get("completed_step", 0)) for b in self.last_beats.values()]
        last = max(beats + [step, last_logged_step(os.path.join(self.run_dir, "metrics.jsonl"))])
        steps_lost = max(0, last - step)
        node = failure.node
        row = {"time": time.time(), "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attempt": attempt,
               "cause": failure.cause, "detail": failure.detail, "rank": failure.rank, "node": node,
               "host": self.last_beats.get(failure.rank, {}).get("hostname") if failure.rank is not None else None,
               "exit_code": failure.exit_code, "signal": failure.signal, "consequences": failure.consequences,
               "checkpoint": path, "checkpoint_step": step, "last_step": last,
               "steps_lost": steps_lost, "action": action.kind, "backoff_s": action.backoff_s,
               "excluded_nodes": list(self.excluded)}
        try:
            append_record(self.run_dir, RESTARTS_FILE, row)
        except OSError as err:  # a full run dir: the record goes to stderr instead
            self.say(f"cannot append to {RESTARTS_FILE} ({err}): {json.dumps(row, default=str)}")
        self.report.steps_lost += steps_lost
        self.alerts.attempt_ended(row)
        self.say(f"attempt {attempt} failed: {failure.cause} (rank {failure.rank}, node {node}, "
                 f"{failure.detail}); last step {last}, checkpoint step {step}, {steps_lost} steps lost; "
                 f"{'restarting' if action.restart else 'stopping'}")

    def _sleep(self, seconds: float) -> bool:
        """Backoff; True when a stop signal arrived meanwhile."""
        if seconds > 0:
            self.say(f"restarting in {seconds:.0f} s")
        deadline = time.time() + seconds
        while time.time() < deadline and self.stop_signal is None:
            time.sleep(min(0.2, max(0.0, deadline - time.time())))
        return self.stop_signal is not None

    def _is_ours(self, checkpoint: str | None) -> bool:
        """``checkpoint`` is one of this run's iter_* directories (so it may be set aside)."""
        path = os.path.realpath(checkpoint or "")
        ours = os.path.dirname(path) == os.path.realpath(self.ckpt_dir) and _STEP_RE.search(path)
        return bool(ours) and os.path.isdir(path)

    def _quarantine(self, failure: Failure) -> None:
        """Rename a corrupt checkpoint of this run out of the way (never delete it)."""
        path = os.path.realpath(failure.checkpoint or "")
        target = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, target)
        failure.detail += f"; moved to {target}"
        self.say(f"checkpoint {path} failed to load: moved to {target}; the next attempt resumes from "
                 f"{self._checkpoint()[0] or 'the start'}")

    def _requeue(self) -> None:
        job = self.environ.get("SLURM_JOB_ID")
        if self.cfg.requeue != "auto" or not self.slurm or not job:
            return
        if not self._requeueable:
            self.say(f"SLURM job {job} was not submitted with --requeue: not requeueing it")
            return
        ok = scontrol("requeue", job)
        self.say(f"scontrol requeue {job}: {'done' if ok else 'failed'}")

    # -- one attempt ------------------------------------------------------------------------------
    def _rank_env(self, attempt: int) -> dict[str, str]:
        env = dict(self.environ, **{SUPERVISED_ENV: "1", ATTEMPT_ENV: str(attempt)})
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(var, None)
        env.update(flight_recorder.rank_env(self.run_dir, env))
        if attempt > 0 and self.cfg.clear_fault_injection and env.pop(FAULT_ENV, None) is not None:
            self.say(f"attempt {attempt}: {FAULT_ENV} cleared (one-shot fault injection; "
                     "resilience.supervisor.clear_fault_injection=false keeps it)")
        return env

    def _start(self, attempt: int) -> Job:
        beats_dir = os.path.join(self.run_dir, "heartbeats")
        shutil.rmtree(beats_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(self.run_dir, EXITS_DIR), ignore_errors=True)
        self._clear_stop_request()
        self.last_beats = {}
        self.attempt_started = time.time()
        self.load_failures_from = checkpoint_load_failures_size(self.run_dir)  # this attempt's records only
        self.watchdog.start_attempt(self.attempt_started)
        env = self._rank_env(attempt)
        if not self.slurm:
            return LocalJob(self.argv, self.world_size, env)
        nodes = [n for n in allocation_nodes(self.environ) if n not in self.excluded]
        if not nodes:
            raise UserError(f"no usable node left in the allocation (excluded: {', '.join(self.excluded)})")
        tpn = self._tasks_per_node()
        # The step's nodes are named (the first `needed` usable ones), so rank 0 and MASTER_ADDR are on nodes[0].
        chosen = nodes[:self._nodes_needed()] if tpn else []
        base = int(self.environ.get("MASTER_PORT") or 20000 + int(self.environ["SLURM_JOB_ID"]) % 20000)
        job = SrunJob(self.argv, self.world_size, env, [] if chosen else self.excluded, tpn, list(self.cfg.srun_args),
                      shlex.split(self.cfg.rank_command), master_addr=resolve_ipv4(nodes[0]),
                      master_port=20000 + (base - 20000 + 7 * attempt) % 40000,
                      name=f"megatron-align-attempt{attempt}", run_dir=self.run_dir,
                      started_at=self.attempt_started, nodelist=chosen)
        self.say(f"attempt {attempt}: {' '.join(job.command)}"
                 + (f" (excluded nodes: {', '.join(self.excluded)})" if self.excluded else ""))
        return job

    def _read_beats(self) -> dict[int, dict]:
        beats = read_heartbeats(self.run_dir)
        self.last_beats.update(beats)
        self.report.observe_beats(beats)
        return beats

    def _watch(self, job: Job) -> Outcome:
        """Poll the attempt until it ends; returns why it ended."""
        next_check = 0.0
        stop_deadline: float | None = None
        fallback_at: float | None = None
        oom_before = _oom_kills()
        while True:
            now = time.time()
            failed = {r: c for r, c in job.poll().items() if c != 0}
            if failed:
                culprit = self._attribute(job, failed, _oom_kills() > oom_before)
                self.report.detected_at = time.time()
                job.terminate(self.cfg.term_grace_s)
                self.report.torn_down_at = time.time()
                return Outcome(self._note_injected(culprit), now)
            if not job.alive():
                self._read_beats()
                return Outcome(None, now)
            lost = self.lock_lost() if self.lock_lost is not None else None
            if lost:  # another run took the run_dir over: stop writing at once, no checkpoint, no restart
                self.say("the run lock was taken over: killing the ranks without a checkpoint")
                job.send_signal(signal.SIGKILL)  # not SIGTERM: that asks the ranks to save first
                job.terminate(0.0)
                raise UserError(lost)
            if self.stop_signal is not None and stop_deadline is None:
                stop_deadline, fallback_at = now + self.cfg.stop_grace_s, now + self.cfg.stop_grace_s / 2
                self._request_stop(job, fallback=False)
            if fallback_at is not None and now > fallback_at:
                fallback_at = None
                self._request_stop(job, fallback=True)
            if stop_deadline is not None and (now > stop_deadline or self.signals_received > 1):
                self.say("ranks did not stop in time (or a second signal came): killing them")
                job.terminate(0.0 if self.signals_received > 1 else self.cfg.term_grace_s)
                return Outcome(Failure("requeue", None, None, "stop grace period exceeded"), now)
            if now >= next_check:
                verdict = self.watchdog.observe(self._read_beats(), now)
                if verdict is not None:
                    return Outcome(self._note_injected(self._hang(job, verdict)), verdict.stalled_since)
                next_check = now + self.cfg.check_interval_s
            time.sleep(0.1)

    def _attribute(self, job: Job, failed: dict[int, int], oom: bool) -> Failure:
        """Which rank failed first, on which node: wait (briefly) for the other ranks' ends to be reported, check
        whether a node of the step is gone, classify every rank, keep the first failure, the rest as consequences."""
        seen = {r: job.task_seen.get(r, time.time()) for r in failed}
        deadline = time.time() + self.cfg.attribution_wait_s
        while time.time() < deadline:
            for r, c in job.poll().items():
                if c != 0 and r not in failed:
                    failed[r] = c
                    seen[r] = job.task_seen.get(r, time.time())
            if job.all_reported():
                break
            time.sleep(0.1)
        records = job.exit_records()
        # A rank's exit record is exact (its own status, the moment it ended); srun reports only some tasks.
        for r, record in records.items():
            code = int(record["exit_code"])
            if code != 0:
                failed[r], seen[r] = code, float(record["time"])
        self._read_beats()
        node_of = {r: job.task_nodes.get(r) or records.get(r, {}).get("node") or self.last_beats.get(r, {}).get("node")
                   for r in range(self.world_size)}
        lost = job.lost_nodes(sorted({n for n in node_of.values() if n} | set(job.nodes)))
        loads = read_checkpoint_load_failures(self.run_dir, self.load_failures_from)
        failures = []
        for r, c in sorted(failed.items()):
            failure = classify_rank(r, c, job.stderr_tail(r), oom, loads.get(r))
            failure.node, failure.observed_at = node_of.get(r), seen.get(r)
            failures.append(failure)
        for node, why in lost.items():
            on_node = [f for f in failures if f.node == node]
            if not on_node:  # srun could not even report the node's tasks
                ranks = [r for r, n in sorted(node_of.items()) if n == node]
                on_node = [Failure("node_lost", ranks[0] if ranks else None, None, "no exit reported", node=node,
                                   observed_at=min(seen.values(), default=None))]
                failures += on_node
            for f in on_node:
                f.cause, f.detail = "node_lost", f"node {node} is gone: {why} ({f.detail})"
        culprit = attribute(failures)
        if culprit.cause == "faulty_gpu":
            self._blame_detected(culprit)
        # Every other rank is a consequence: failed with it, or still running and ended by the teardown.
        others = {f.rank: {"rank": f.rank, "node": f.node, "cause": f.cause, "status": describe_status(f.exit_code)}
                  for f in failures}
        others.update({r: {"rank": r, "node": node_of.get(r), "cause": "torn_down", "status": "running"}
                       for r in range(self.world_size) if r not in others})
        culprit.consequences = [c for r, c in sorted(others.items(), key=lambda rc: -1 if rc[0] is None else rc[0])
                                if r != culprit.rank]
        return culprit

    def _blame_detected(self, failure: Failure) -> None:
        """Every rank exits 86 on a detector's verdict: the rank it blamed is in health.jsonl / stragglers.jsonl."""
        for name, blamed in ((HEALTH_FILE, lambda r: r.get("severity") == "fail"),
                             (STRAGGLERS_FILE, lambda r: r.get("blamed"))):
            for record in reversed(read_records(self.run_dir, name, since=self.attempt_started)):
                if blamed(record):
                    failure.rank, failure.node = record.get("rank"), record.get("hostname")
                    failure.detail += (
                        f"; {name}: rank {failure.rank} on {failure.node}: "
                        f"{record.get('message') or record.get('section')}"
                    )
                    return

    def _request_stop(self, job: Job, fallback: bool) -> None:
        """Ask the ranks to checkpoint and stop (SIGINT is forwarded as SIGUSR1); ``fallback``: they have not stopped
        after half the grace period. How the request reaches them is the job's business."""
        signum = self.stop_signal
        if signum is None:
            return
        sig = signal.SIGUSR1 if signum == signal.SIGINT else signum
        if not fallback:
            self.say(f"{signal.Signals(signum).name}: asking the ranks to checkpoint and stop "
                     f"(grace {self.cfg.stop_grace_s:.0f} s)")
        note = job.request_stop(sig, fallback)
        if note:
            self.say(note)

    def _clear_stop_request(self) -> None:
        try:
            os.remove(os.path.join(self.run_dir, STOP_REQUEST_FILE))
        except FileNotFoundError:
            pass

    def _hang(self, job: Job, verdict) -> Failure:
        """Report the hang, make every rank dump its stacks, tear the job down."""
        self.say(f"HANG: {verdict.describe()}")
        self.report.detected_at = time.time()
        paths = {r: stacks_path(self.run_dir, r) for r in range(self.world_size)}
        sizes = {r: _size(p) for r, p in paths.items()}
        job.send_signal(signal.SIGUSR2)
        deadline = time.time() + self.cfg.stack_dump_wait_s
        while time.time() < deadline and any(_size(p) <= sizes[r] for r, p in paths.items()):
            time.sleep(0.1)
        dumped = [r for r, p in paths.items() if _size(p) > sizes[r]]
        silent = [r for r in range(self.world_size) if r not in dumped]
        suspects = silent if dumped and silent else verdict.suspects
        detail = verdict.describe()
        if dumped and silent:
            detail += f"; ranks {silent} did not answer SIGUSR2 (stuck outside Python or stopped)"
        self.say(f"stacks of ranks {dumped} dumped to {os.path.join(self.run_dir, 'stacks')}"
                 + (f"; no stacks from ranks {silent}" if silent else ""))
        job.terminate(self.cfg.term_grace_s)
        self.report.torn_down_at = time.time()
        recorded, differing = flight_recorder.describe(self.run_dir, self.world_size, since=self.attempt_started)
        if recorded:  # GPU: the rank whose last collective differs is the one to blame
            self.say(recorded)
            detail, suspects = f"{detail}; {recorded}", differing or suspects
        node = self.last_beats.get(suspects[0], {}).get("node")
        lost = job.lost_nodes([node]) if node else {}
        if node in lost:
            return Failure("node_lost", suspects[0], None, f"node {node} is gone: {lost[node]}; {detail}",
                           evidence=[f"suspects: {suspects}"], node=node)
        return Failure("hang", suspects[0], None, detail, evidence=[f"suspects: {suspects}"], node=node)

    def _note_injected(self, failure: Failure) -> Failure:
        """Name the drill: faults the ranks recorded in faults_fired.jsonl during this attempt."""
        fired = [f"{item.get('fault')} on rank {item.get('rank')}"
                 for item in read_records(self.run_dir, FAULTS_FIRED_FILE, since=self.attempt_started)]
        if fired:
            failure.detail += f" [injected fault: {', '.join(fired)}]"
        return failure


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _oom_kills() -> int:
    """The kernel OOM killer's count for this process's cgroup (v2), 0 when unknown."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = f.read().strip().split("::", 1)[-1]
        with open(os.path.join("/sys/fs/cgroup", rel.lstrip("/"), "memory.events")) as f:
            return next((int(line.split()[1]) for line in f if line.startswith("oom_kill ")), 0)
    except (OSError, ValueError, IndexError):
        return 0


def supervise(config: RootConfig, config_path: str, overrides: list[str]) -> int:
    """Check the layout and the data files (exit 2 naming the problem, nothing started), then run the supervisor."""
    from megatron_align.parallel.layout import validate_layout

    validate_layout(config, config.parallel.world_size)
    check_data_files(config)  # a damaged .idx/.bin: exit 2 naming the file, nothing started
    # One run per run_dir, held across every attempt; the ranks inherit it (MEGATRON_ALIGN_RUN_LOCK).
    lock = run_lock.hold(config.run_dir, config.run_lock, "megatron-align launch")
    try:
        environ = dict(os.environ, **lock.env()) if lock else os.environ
        return Supervisor(config, config_path, overrides, environ, lock_lost=lock.lost_reason if lock else None).run()
    finally:
        if lock:
            lock.release()
