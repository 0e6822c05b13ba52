"""`megatron-align launch CONFIG.yaml [key=value ...]`: the restart manager around a training run.

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
4. act on the cause: a corrupt *complete* checkpoint that failed to load is renamed to
   ``iter_N.corrupt-<time>`` (never deleted) so the next attempt resumes from the one before;
   nodes in ``run_dir/exclude_nodes.txt`` (and the node of a GPU fault) are ``--exclude``-d under
   SLURM; a user error or exit 93 stops; everything else restarts after an exponential backoff,
   within ``max_restarts``, ``max_restarts_per_hour`` and ``max_no_progress_restarts``;
5. append one line per failure to ``run_dir/restarts.jsonl`` (time, cause, rank, node, exit code,
   checkpoint used, steps lost).

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

Exit codes: 0 completed, 2 user error, 75 stopped to be requeued, 89 storage, 93 gave up (do not requeue).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from megatron_align.config import RootConfig, load_config
from megatron_align.data.indexed_check import check_data_files
from megatron_align.training.checkpoint_files import resolve_checkpoint
from megatron_align.errors import UserError
from megatron_align.parallel.spawn import distributed_env
from megatron_align.resilience import exit_codes, storage
from megatron_align.resilience.faults import ENV_VAR as FAULT_ENV_VAR
from megatron_align.resilience.supervisor.failures import Failure, attribute, classify_rank, describe_status
from megatron_align.resilience.heartbeat_files import (
    ATTEMPT_ENV,
    STOP_REQUEST_FILE,
    SUPERVISED_ENV,
    read_heartbeats,
    stacks_path,
    write_json_atomic,
)
from megatron_align.resilience.rank_exit import EXITS_DIR, read_exit_records
from megatron_align.resilience.supervisor.jobs import (LocalJob, SrunJob, allocation_nodes, lost_nodes,
                                                      tasks_per_node_of_allocation)
from megatron_align.resilience.supervisor.run_report import RunReport, last_logged_step
from megatron_align.resilience.supervisor.watchdog import HangWatchdog

FAULT_ENV = FAULT_ENV_VAR
EXIT_GAVE_UP = exit_codes.EXIT_DO_NOT_REQUEUE
_STEP_RE = re.compile(r"iter_(\d+)$")


def newest_checkpoint(ckpt_dir: str) -> tuple[str | None, int]:
    """(path, step) of the checkpoint the trainer will resume from (the trainer's own rule, torch-free)."""
    path = resolve_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    return (path, int(os.path.basename(path)[len("iter_"):])) if path else (None, 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (as for `megatron-align train`)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. resilience.supervisor.max_restarts=3")


@dataclass
class Outcome:
    """How one attempt ended: every rank exited 0, or a failure (exit, hang, stop timeout)."""

    failure: Failure | None
    failed_at: float


class Supervisor:
    def __init__(self, config: RootConfig, config_path: str, overrides: list[str], environ=os.environ) -> None:
        self.config = config
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
        # Nodes left out of every attempt: this run's own list (kept across attempts and requeues) and the
        # preflight's exclude file (resilience.supervisor.exclude_file).
        self.excluded: list[str] = []
        if self.slurm:
            flagged = exit_codes.read_exclude_nodes(self.run_dir) + exit_codes.read_exclude_file(self.cfg.exclude_file)
            allocation = allocation_nodes(self.environ)
            self.excluded = [n for n in dict.fromkeys(flagged) if n in allocation]
        self.report.excluded = self.excluded

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
            if not getattr(self, "_log_failed", False):
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

    def _rank_env(self, attempt: int) -> dict[str, str]:
        env = dict(self.environ, **{SUPERVISED_ENV: "1", ATTEMPT_ENV: str(attempt)})
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(var, None)
        if attempt > 0 and self.cfg.clear_fault_injection and env.pop(FAULT_ENV, None) is not None:
            self.say(f"attempt {attempt}: {FAULT_ENV} cleared (one-shot fault injection; "
                     "resilience.supervisor.clear_fault_injection=false keeps it)")
        return env

    # -- one attempt ------------------------------------------------------------------------------
    def _start(self, attempt: int):
        beats_dir = os.path.join(self.run_dir, "heartbeats")
        shutil.rmtree(beats_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(self.run_dir, EXITS_DIR), ignore_errors=True)
        self._clear_stop_request()
        self.last_beats = {}
        self.attempt_started = time.time()
        self.load_failures_from = exit_codes.checkpoint_load_failures_size(self.run_dir)  # this attempt's records only
        self.watchdog.start_attempt(self.attempt_started)
        env = self._rank_env(attempt)
        if not self.slurm:
            return LocalJob(self.argv, self.world_size, env)
        nodes = [n for n in allocation_nodes(self.environ) if n not in self.excluded]
        if not nodes:
            raise UserError(f"no usable node left in the allocation (excluded: {', '.join(self.excluded)})")
        tpn = self._tasks_per_node()
        # The step's nodes are named (the first `needed` usable ones), so rank 0 and MASTER_ADDR are on nodes[0].
        chosen = nodes[:-(-self.world_size // tpn)] if tpn else []
        base = int(self.environ.get("MASTER_PORT") or 20000 + int(self.environ["SLURM_JOB_ID"]) % 20000)
        job = SrunJob(self.argv, self.world_size, env, [] if chosen else self.excluded, tpn, list(self.cfg.srun_args),
                      shlex.split(self.cfg.rank_command), master_addr=resolve_ipv4(nodes[0]),
                      master_port=20000 + (base - 20000 + 7 * attempt) % 40000,
                      name=f"megatron-align-attempt{attempt}", nodelist=chosen, exit_records=self.run_dir)
        self.say(f"attempt {attempt}: {' '.join(job.command)}"
                 + (f" (excluded nodes: {', '.join(self.excluded)})" if self.excluded else ""))
        return job

    def _tasks_per_node(self) -> int:
        return self.cfg.tasks_per_node or tasks_per_node_of_allocation(self.environ)

    def _read_beats(self) -> dict[int, dict]:
        beats = read_heartbeats(self.run_dir)
        self.last_beats.update(beats)
        self.report.observe_beats(beats)
        return beats

    def _watch(self, job) -> Outcome:
        """Poll the attempt until it ends; returns why it ended."""
        next_check = 0.0
        stop_deadline: float | None = None
        fallback_at: float | None = None
        oom_before = _oom_kills()
        while True:
            now = time.time()
            failed = {r: c for r, c in job.poll().items() if c != 0}
            if job.kind == "srun":  # a rank's own exit record comes before srun reports anything (if it ever does)
                failed.update({r: int(e["exit_code"]) for r, e in read_exit_records(self.run_dir, self.attempt_started).items()
                               if int(e["exit_code"]) != 0})
            if failed:
                culprit = self._attribute(job, failed, _oom_kills() > oom_before)
                self.report.detected_at = time.time()
                job.terminate(self.cfg.term_grace_s)
                self.report.torn_down_at = time.time()
                return Outcome(self._note_injected(culprit), now)
            if not job.alive():
                self._read_beats()
                return Outcome(None, now)
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

    def _attribute(self, job, failed: dict[int, int], oom: bool) -> Failure:
        """Which rank failed first, on which node: wait (briefly) for the other ranks' ends to be reported, check
        whether a node of the step is gone, classify every rank, keep the first failure, the rest as consequences."""
        seen = {r: job.task_seen.get(r, time.time()) for r in failed}
        deadline = time.time() + self.cfg.attribution_wait_s
        records: dict[int, dict] = {}
        while time.time() < deadline:
            for r, c in job.poll().items():
                if c != 0 and r not in failed:
                    failed[r] = c
                    seen[r] = job.task_seen.get(r, time.time())
            if job.kind != "srun":
                if not job.alive():
                    break
            else:  # every rank's own exit record, or srun gone: nothing more will come
                records = read_exit_records(self.run_dir, since=self.attempt_started)
                if len(records) >= self.world_size or not job.alive():
                    break
            time.sleep(0.1)
        # A rank's exit record is exact (its own status, the moment it ended); srun reports only some tasks.
        for r, record in records.items():
            code = int(record["exit_code"])
            if code != 0:
                failed[r], seen[r] = code, float(record["time"])
        self._read_beats()
        node_of = {r: job.task_nodes.get(r) or records.get(r, {}).get("node") or self.last_beats.get(r, {}).get("node")
                   for r in range(self.world_size)}
        lost = lost_nodes(sorted({n for n in node_of.values() if n} | set(job.nodes))) if self.slurm else {}
        loads = exit_codes.read_checkpoint_load_failures(self.run_dir, self.load_failures_from)
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
        for name, blamed in ((exit_codes.HEALTH_FILE, lambda r: r.get("severity") == "fail"),
                             (exit_codes.STRAGGLERS_FILE, lambda r: r.get("blamed"))):
            for record in reversed(_read_jsonl(os.path.join(self.run_dir, name))):
                if float(record.get("time", 0)) >= self.attempt_started and blamed(record):
                    failure.rank, failure.node = record.get("rank"), record.get("hostname")
                    failure.detail += f"; {name}: rank {failure.rank} on {failure.node}: {record.get('message') or record.get('section')}"
                    return

    def _request_stop(self, job, fallback: bool) -> None:
        """Ask the ranks to checkpoint and stop: local ranks by signal; srun steps through ``run_dir/stop_request``
        (srun would deliver a signal to every process of the step, checkpoint writer helpers included), and
        by signal through srun only as the fallback when they have not stopped after half the grace period."""
        name = signal.Signals(self.stop_signal).name
        sig = signal.SIGUSR1 if self.stop_signal == signal.SIGINT else self.stop_signal
        if fallback:
            if job.kind == "srun":
                self.say(f"ranks still running: forwarding {signal.Signals(sig).name} through srun")
                job.send_signal(sig)
            return
        self.say(f"{name}: asking the ranks to checkpoint and stop (grace {self.cfg.stop_grace_s:.0f} s)")
        if job.kind == "srun":
            try:
                write_json_atomic(os.path.join(self.run_dir, STOP_REQUEST_FILE), {"signal": name, "time": time.time()})
            except OSError as err:  # a full run dir: the signal fallback below still stops the ranks
                self.say(f"cannot write {STOP_REQUEST_FILE} ({err}): forwarding {signal.Signals(sig).name} through srun now")
                job.send_signal(sig)
        else:
            job.send_signal(sig)

    def _clear_stop_request(self) -> None:
        try:
            os.remove(os.path.join(self.run_dir, STOP_REQUEST_FILE))
        except FileNotFoundError:
            pass

    def _hang(self, job, verdict) -> Failure:
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
        node = self.last_beats.get(suspects[0], {}).get("node")
        lost = lost_nodes([node]) if self.slurm and node else {}
        if lost:
            return Failure("node_lost", suspects[0], None, f"node {node} is gone: {lost[node]}; {detail}",
                           evidence=[f"suspects: {suspects}"], node=node)
        return Failure("hang", suspects[0], None, detail, evidence=[f"suspects: {suspects}"], node=node)

    def _note_injected(self, failure: Failure) -> Failure:
        """Name the drill: faults the ranks recorded in faults_fired.jsonl during this attempt."""
        fired = [f"{item.get('fault')} on rank {item.get('rank')}" for item in
                 exit_codes.read_jsonl(os.path.join(self.run_dir, exit_codes.FAULTS_FIRED_FILE), self.attempt_started)]
        if fired:
            failure.detail += f" [injected fault: {', '.join(fired)}]"
        return failure

    # -- the restart loop -------------------------------------------------------------------------
    def run(self) -> int:
        os.makedirs(self.run_dir, exist_ok=True)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
        attempt, no_progress, restart_times = 0, 0, []
        code, outcome_text = 0, "completed"
        self.say(f"supervising {self.world_size} rank(s) of {' '.join(self.argv)} "
                 f"({'srun in SLURM job ' + self.environ['SLURM_JOB_ID'] if self.slurm else 'local processes'})")
        try:
            while True:
                ckpt_before = self._checkpoint()[1]
                job = self._start(attempt)
                self.report.attempt_started(attempt)
                outcome = self._watch(job)
                failure = outcome.failure
                if failure is None:
                    code, outcome_text = self._finished_cleanly()
                    break
                if self.stop_signal is not None or failure.cause == "requeue":
                    self._record(attempt, failure, "stop")
                    code, outcome_text = exit_codes.EXIT_REQUEUE, "stopped to be requeued"
                    break
                if failure.cause == "storage":
                    self._record(attempt, failure, "stop")
                    code, outcome_text = exit_codes.EXIT_STORAGE, self._storage_verdict()
                    break
                if not failure.retryable:
                    self._record(attempt, failure, "stop")
                    code = exit_codes.EXIT_USER_ERROR if failure.cause == "user_error" else EXIT_GAVE_UP
                    outcome_text = f"not retried ({failure.cause}): {failure.detail}"
                    break
                if failure.cause == "corrupt_checkpoint" and not self._quarantine(failure):
                    self._record(attempt, failure, "stop")
                    code, outcome_text = exit_codes.EXIT_USER_ERROR, f"not retried: {failure.detail}"
                    break
                progressed = self._checkpoint()[1] > ckpt_before or failure.cause == "corrupt_checkpoint"
                no_progress = 0 if progressed else no_progress + 1
                now = time.time()
                restart_times = [t for t in restart_times if now - t < 3600.0]
                spent = self._budget_spent(attempt, len(restart_times), no_progress)
                if spent:
                    self._record(attempt, failure, "stop")
                    code, outcome_text = EXIT_GAVE_UP, f"gave up after {failure.cause}: {spent}"
                    break
                stop = self._exclude_nodes(failure)
                if stop is not None:
                    self._record(attempt, failure, "stop")
                    code, outcome_text = stop
                    break
                backoff = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** max(0, no_progress - 1))
                self._record(attempt, failure, "restart", backoff)
                self.report.failure(attempt, failure.cause, outcome.failed_at)
                if self._sleep(backoff):
                    code, outcome_text = exit_codes.EXIT_REQUEUE, "stopped to be requeued (signal during backoff)"
                    break
                restart_times.append(time.time())
                attempt += 1
        finally:
            self._clear_stop_request()
            for s, handler in handlers.items():
                signal.signal(s, handler)
        summary = self.report.finish(code, outcome_text, self._checkpoint()[1])
        print(summary, flush=True)
        if code == exit_codes.EXIT_REQUEUE:
            self._requeue()
        return code

    def _finished_cleanly(self) -> tuple[int, str]:
        step = self._checkpoint()[1]
        t = self.config.train
        if step >= t.steps or (t.stop_at_step and step >= t.stop_at_step):
            return exit_codes.EXIT_OK, "completed"
        if self.stop_signal is not None:
            return exit_codes.EXIT_REQUEUE, f"stopped to be requeued at step {step}"
        return exit_codes.EXIT_OK, f"ranks exited 0 at step {step} before train.steps={t.steps} (a requested stop)"

    def _budget_spent(self, attempt: int, in_last_hour: int, no_progress: int) -> str | None:
        cfg = self.cfg
        if attempt >= cfg.max_restarts:
            return f"restart budget spent (resilience.supervisor.max_restarts={cfg.max_restarts})"
        if in_last_hour >= cfg.max_restarts_per_hour:
            return f"{in_last_hour} restarts within the last hour (max_restarts_per_hour={cfg.max_restarts_per_hour})"
        if no_progress > cfg.max_no_progress_restarts:
            return (f"{no_progress - 1} consecutive restarts committed no new checkpoint "
                    f"(max_no_progress_restarts={cfg.max_no_progress_restarts})")
        return None

    def _sleep(self, seconds: float) -> bool:
        """Backoff; True when a stop signal arrived meanwhile."""
        if seconds > 0:
            self.say(f"restarting in {seconds:.0f} s")
        deadline = time.time() + seconds
        while time.time() < deadline and self.stop_signal is None:
            time.sleep(min(0.2, max(0.0, deadline - time.time())))
        return self.stop_signal is not None

    # -- acting on a cause ------------------------------------------------------------------------
    def _storage_verdict(self) -> str:
        """One message: where, how much space, which checkpoint is intact, what to do (never a restart)."""
        records = storage.read_storage_failures(self.run_dir, since=self.attempt_started)
        record = next((r for r in records if r.get("needed_bytes")), records[0] if records else None)
        if record is None:  # the disk was too full even for the record
            record = {"path": self.run_dir, "errno": errno.ENOSPC, "free_bytes": storage.free_bytes(self.run_dir)}
        code = int(record.get("errno") or errno.ENOSPC)
        needed = f", checkpoint needs ~{storage.human(record['needed_bytes'])}" if record.get("needed_bytes") else ""
        path, _step = self._checkpoint()
        intact = (f"latest good checkpoint {os.path.basename(path)} is intact" if path
                  else "no checkpoint was written yet")
        todo = {errno.EROFS: "the filesystem is read-only (remounted after errors?): have it fixed",
                errno.EIO: "the filesystem reports I/O errors: have it checked (dmesg)"}.get(
            code, "free space or lower checkpoint.keep_last" if path else "free space")
        where = "" if os.path.abspath(str(record.get("path"))) == os.path.abspath(self.run_dir) else f" at {record.get('path')}"
        return (f"run_dir {self.run_dir}: {storage.STORAGE_ERRNOS.get(code, os.strerror(code))}{where} "
                f"(free {storage.human(record.get('free_bytes'))}{needed}); {intact}; {todo}, then run the same command "
                f"(not restarted: a restart meets the same filesystem)")

    def _quarantine(self, failure: Failure) -> bool:
        """Rename a corrupt checkpoint of this run out of the way (never delete it); False if not ours."""
        path = os.path.realpath(failure.checkpoint or "")
        ours = os.path.dirname(path) == os.path.realpath(self.ckpt_dir) and _STEP_RE.search(path)
        if not ours or not os.path.isdir(path):
            self.say(f"{failure.checkpoint} is not a checkpoint of this run's {self.ckpt_dir}: not touching it")
            return False
        target = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, target)
        failure.detail += f"; moved to {target}"
        self.say(f"checkpoint {path} failed to load: moved to {target}; the next attempt resumes from "
                 f"{self._checkpoint()[0] or 'the start'}")
        return True

    def _exclude_nodes(self, failure: Failure) -> tuple[int, str] | None:
        """Merge flagged nodes into the exclude list; (exit code, text) when the job cannot continue here."""
        node = failure.node
        flagged = exit_codes.read_exclude_nodes(self.run_dir)
        detector_named = [n for n in flagged if n not in self.excluded]
        if node and (failure.cause == "node_lost" or (failure.cause == "faulty_gpu" and not detector_named)):
            flagged = exit_codes.add_exclude_nodes(self.run_dir, [node])
        new = [n for n in flagged if n not in self.excluded]
        if not new:
            return None
        if not self.slurm:
            self.say(f"nodes flagged for exclusion: {', '.join(new)} (not in a SLURM allocation: restarting here anyway)")
            self.excluded.extend(new)
            return None
        allocation = allocation_nodes(self.environ)
        self.excluded.extend(n for n in new if n in allocation)
        left = [n for n in allocation if n not in self.excluded]
        tpn = self._tasks_per_node()
        needed = -(-self.world_size // tpn) if tpn else 1
        self.say(f"excluding nodes {', '.join(self.excluded)}: {len(left)} of {len(allocation)} nodes left, {needed} needed")
        if len(left) >= needed:
            return None
        if self.cfg.requeue == "auto" and _requeueable(self.environ["SLURM_JOB_ID"]):
            # Every node this run ever flagged, not only this allocation's: the requeued job may be placed anywhere.
            every = list(dict.fromkeys(self.excluded + flagged + exit_codes.read_exclude_file(self.cfg.exclude_file)))
            _scontrol("update", f"JobId={self.environ['SLURM_JOB_ID']}", f"ExcNodeList={','.join(every)}")
            return exit_codes.EXIT_REQUEUE, f"requeued excluding {', '.join(every)}"
        return EXIT_GAVE_UP, (f"not enough nodes after excluding {', '.join(self.excluded)}: resubmit with "
                              f"sbatch --exclude={','.join(self.excluded)}")

    def _record(self, attempt: int, failure: Failure, action: str, backoff_s: float = 0.0) -> None:
        path, step = self._checkpoint()
        # The ranks are gone: read their final heartbeats. A SIGKILLed rank may die before its writer thread
        # flushes the last step, so rank 0's metrics log counts too.
        self._read_beats()
        beats = [int(b.get("completed_step", 0)) for b in self.last_beats.values()]
        last = max(beats + [step, last_logged_step(os.path.join(self.run_dir, "metrics.jsonl"))])
        node = failure.node
        row = {"time": time.time(), "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attempt": attempt,
               "cause": failure.cause, "detail": failure.detail, "rank": failure.rank, "node": node,
               "host": self.last_beats.get(failure.rank, {}).get("hostname") if failure.rank is not None else None,
               "exit_code": failure.exit_code, "signal": failure.signal, "consequences": failure.consequences,
               "checkpoint": path, "checkpoint_step": step, "last_step": last,
               "steps_lost": max(0, last - step), "action": action, "backoff_s": backoff_s,
               "excluded_nodes": list(self.excluded)}
        try:
            exit_codes.append_jsonl(os.path.join(self.run_dir, "restarts.jsonl"), row)
        except OSError as err:  # a full run dir: the record goes to stderr instead
            self.say(f"cannot append to restarts.jsonl ({err}): {json.dumps(row, default=str)}")
        self.report.steps_lost += row["steps_lost"]
        self.say(f"attempt {attempt} failed: {failure.cause} (rank {failure.rank}, node {node}, "
                 f"{failure.detail}); last step {last}, checkpoint step {step}, {row['steps_lost']} steps lost; "
                 f"{'restarting' if action == 'restart' else 'stopping'}")

    def _requeue(self) -> None:
        job = self.environ.get("SLURM_JOB_ID")
        if self.cfg.requeue != "auto" or not self.slurm or not job:
            return
        if not _requeueable(job):
            self.say(f"SLURM job {job} was not submitted with --requeue: not requeueing it")
            return
        ok = _scontrol("requeue", job)
        self.say(f"scontrol requeue {job}: {'done' if ok else 'failed'}")


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def resolve_ipv4(host: str) -> str:
    """``host``'s IPv4 address, looked up once here, so the ranks' rendezvous gets an address, not a name (a name
    with no IPv6 address makes torch's c10d store warn on every connection attempt); the name if it has none."""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        return host


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


def _scontrol(*args: str) -> bool:
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _requeueable(job: str) -> bool:
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Requeue=1" in out.split()


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)  # a bad config fails here: exit 2, nothing started
    if distributed_env() is not None:
        # Already one task of a torchrun/srun job: supervise nothing, be a rank (as `train` would).
        print("megatron-align launch: started inside a torchrun/srun step: running as a rank like `train`; "
              "run `launch` outside srun (in the batch script) to get restarts", file=sys.stderr)
        from megatron_align.training import launch

        return launch.run(args)
    from megatron_align.parallel.layout import validate_layout

    validate_layout(config, config.parallel.world_size)
    check_data_files(config)  # a damaged .idx/.bin: exit 2 naming the file, nothing started
    return Supervisor(config, args.config, list(args.overrides)).run()
