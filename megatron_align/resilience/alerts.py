"""Webhook alerts: tell a person when a long run needs one (give-up, excluded node, storage, hang, repeated
restarts from the supervisor; a stall or a skipped-step burst from rank 0).

One Slack-compatible JSON POST per alert: ``{"text": "...", "kind", "run", "run_dir", "verdict", "node",
"rank", "host", "source", "time", ...}`` (Slack shows ``text``; other receivers read the fields). The URL
comes only from ``$MEGATRON_ALIGN_ALERT_WEBHOOK``: config.yaml is written into run_dir and a webhook URL is a
secret. Posts go out on a daemon thread with a short timeout through a bounded queue, so a slow, failing or
unreachable receiver never holds up training or the supervisor; a failure is logged, never raised.
Rate limits (``resilience.alerts``): one alert of a kind per ``min_interval_s``, ``max_per_hour`` in all.
Stdlib only (no torch): the supervisor and the ranks both import it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import socket
import threading
import time
import urllib.request

log = logging.getLogger(__name__)

WEBHOOK_ENV = "MEGATRON_ALIGN_ALERT_WEBHOOK"


class Alerter:
    """Rate-limited, non-blocking webhook sender for one process (see module docstring)."""

    def __init__(self, run_dir: str, source: str, cfg, environ=os.environ, clock=time.time) -> None:
        self.url = environ.get(WEBHOOK_ENV) or None
        self.run_dir = os.path.abspath(run_dir)
        self.source, self.cfg, self.clock = source, cfg, clock
        self.slurm_job_id = environ.get("SLURM_JOB_ID")
        self.sent: list[float] = []  # times of alerts queued within the last hour
        self.last_of_kind: dict[str, float] = {}
        self.held_back = 0
        self.failures = 0
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, kind: str, text: str, **fields) -> bool:
        """Queue one alert; False when there is no webhook or a rate limit holds it back. Never blocks."""
        if self.url is None:
            return False
        with self._lock:  # the stall watcher's thread and the training thread may both send
            return self._send(kind, text, fields)

    def _send(self, kind: str, text: str, fields: dict) -> bool:
        now = self.clock()
        self.sent = [t for t in self.sent if now - t < 3600.0]
        last = self.last_of_kind.get(kind)
        if (last is not None and now - last < self.cfg.min_interval_s) or len(self.sent) >= self.cfg.max_per_hour:
            self.held_back += 1
            log.info("alert %s held back by the rate limit (resilience.alerts): %s", kind, text)
            return False
        self.sent.append(now)
        self.last_of_kind[kind] = now
        run = os.path.basename(self.run_dir)
        note = f" ({self.held_back} earlier alert(s) held back by the rate limit)" if self.held_back else ""
        payload = {"text": f"[megatron-align {run}] {kind}: {text}{note}", "kind": kind, "run": run,
                   "run_dir": self.run_dir, "source": self.source, "host": socket.gethostname(),
                   "slurm_job_id": self.slurm_job_id, "time": now, "held_back": self.held_back,
                   **fields}
        self.held_back = 0
        try:
            self._queue.put_nowait(json.dumps(payload, default=str).encode())
        except queue.Full:
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._post_loop, name="megatron-align-alerts", daemon=True)
            self._thread.start()
        return True

    def _post_loop(self) -> None:
        while True:
            body = self._queue.get()
            try:
                request = urllib.request.Request(self.url, data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    response.read()
            except Exception as err:  # unreachable, slow, 4xx/5xx: logged, never raised
                self.failures += 1
                if self.failures <= 3:
                    log.warning("alert webhook ($%s) failed: %s: %s", WEBHOOK_ENV, type(err).__name__, err)
            finally:
                self._queue.task_done()

    def drain(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for queued alerts to go out (a process about to exit); True when none is left."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks


class SupervisorAlerts:
    """What the supervisor's record of each ended attempt (a restarts.jsonl row) is worth an alert for."""

    def __init__(self, alerter: Alerter, excluded: list[str] = ()) -> None:
        self.alerter = alerter
        self.excluded: set[str] = set(excluded)  # known before this launch: no alert
        self.restarts: list[float] = []

    def attempt_ended(self, row: dict) -> None:
        fields = {"verdict": row.get("cause"), "node": row.get("node"), "rank": row.get("rank"),
                  "attempt": row.get("attempt"), "detail": row.get("detail"), "last_step": row.get("last_step")}
        where = f"rank {row.get('rank')} on node {row.get('node')}"
        cause = row.get("cause")
        if cause == "hang":
            self.alerter.send("hang", f"hang verdict ({where}): {row.get('detail')}", **fields)
        if cause == "storage":
            self.alerter.send("storage", f"storage verdict, job stopped: {row.get('detail')}", **fields)
        new = [n for n in row.get("excluded_nodes") or [] if n not in self.excluded]
        if new:
            self.excluded.update(new)
            self.alerter.send("node_excluded", f"node(s) {', '.join(new)} excluded after {cause} ({where})",
                              **{**fields, "excluded_nodes": new})
        if row.get("action") == "stop":
            if cause not in ("requeue", "storage"):
                self.alerter.send("give_up", f"job stopped, not restarted, after {cause} ({where}): "
                                  f"{row.get('detail')}; last step {row.get('last_step')}", **fields)
            return
        now = self.alerter.clock()
        self.restarts = [t for t in self.restarts if now - t < 3600.0] + [now]
        if len(self.restarts) >= self.alerter.cfg.restarts_per_hour:
            self.alerter.send("restarts", f"{len(self.restarts)} restarts within the last hour, latest after "
                              f"{cause} ({where})", **{**fields, "restarts_last_hour": len(self.restarts)})


class StallWatch:
    """Rank 0: a daemon thread that alerts once when no step has ended for ``stall_after_s`` (again only after
    progress resumed). ``progress()`` is all the training loop calls: one float store."""

    def __init__(self, alerter: Alerter, stall_after_s: float, check_s: float | None = None) -> None:
        self.alerter, self.stall_after_s = alerter, stall_after_s
        self.check_s = check_s if check_s is not None else min(30.0, max(0.05, stall_after_s / 10))
        self.last_progress, self.last_step = time.monotonic(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="megatron-align-stall-watch", daemon=True)
        self._thread.start()

    def progress(self, step: int | None = None) -> None:
        self.last_progress, self.last_step = time.monotonic(), step

    def _watch(self) -> None:
        alerted_at = None
        while not self._stop.wait(self.check_s):
            since = self.last_progress
            if time.monotonic() - since >= self.stall_after_s and alerted_at != since:
                alerted_at = since
                self.alerter.send("stall", f"no training step has ended for {time.monotonic() - since:.0f} s "
                                  f"(last step {self.last_step}, host {socket.gethostname()})",
                                  verdict="stall", node=socket.gethostname(), rank=0, last_step=self.last_step)

    def close(self) -> None:
        self._stop.set()


_RANK_ALERTERS: dict[str, Alerter] = {}


def rank_alerter(config) -> Alerter:
    """This rank process's Alerter for ``config.run_dir`` (one per process, so rate limits hold across callers)."""
    key = os.path.abspath(config.run_dir)
    if key not in _RANK_ALERTERS:
        _RANK_ALERTERS[key] = alerter = Alerter(config.run_dir, "rank0", config.resilience.alerts)
        atexit.register(alerter.drain, 5.0)  # an alert queued just before the rank exits still goes out
    return _RANK_ALERTERS[key]
