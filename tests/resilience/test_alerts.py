"""Webhook alerts against a real HTTP server on 127.0.0.1: payloads, rate limits, the supervisor's and rank 0's
triggers, and that an unreachable or hanging receiver never holds up the caller."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from megatron_align.config.resilience import AlertsConfig, SkipStepConfig
from megatron_align.resilience.alerts import WEBHOOK_ENV, Alerter, StallWatch, SupervisorAlerts


class Receiver:
    """A webhook receiver: every POSTed JSON body, in order (``delay_s``: a receiver that answers late)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.bodies: list[dict] = []
        received, delay = self.bodies, delay_s

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay)
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.bodies) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.bodies


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def _row(cause: str, action: str = "restart", excluded=(), **extra) -> dict:
    return {"attempt": 0, "cause": cause, "detail": f"{cause} seen", "rank": 1, "node": "node7", "action": action,
            "last_step": 12, "excluded_nodes": list(excluded), **extra}


def test_supervisor_alerts_are_sent_once_each_with_run_verdict_and_node(tmp_path, receiver):
    now = [1000.0]
    alerter = Alerter(str(tmp_path / "run_a"), "supervisor", AlertsConfig(restarts_per_hour=2),
                      environ={WEBHOOK_ENV: receiver.url}, clock=lambda: now[0])
    alerts = SupervisorAlerts(alerter, excluded=["node1"])
    alerts.attempt_ended(_row("crash", excluded=["node1"]))  # node1 known before this launch: nothing
    now[0] += 60
    alerts.attempt_ended(_row("hang", excluded=["node1", "node7"]))  # hang + node7 excluded + 2nd restart
    now[0] += 60
    alerts.attempt_ended(_row("storage", action="stop", excluded=["node1", "node7"]))
    assert alerter.drain(10.0)
    bodies = receiver.wait_for(4)
    assert [b["kind"] for b in bodies] == ["hang", "node_excluded", "restarts", "storage"]
    for body in bodies:
        assert body["run"] == "run_a" and body["node"] == "node7" and body["rank"] == 1
        assert body["source"] == "supervisor" and body["text"].startswith("[megatron-align run_a] ")
    assert [b["verdict"] for b in bodies] == ["hang", "hang", "hang", "storage"]
    assert bodies[1]["excluded_nodes"] == ["node7"] and bodies[2]["restarts_last_hour"] == 2

    alerts.attempt_ended(_row("crash", action="stop"))
    assert alerter.drain(10.0)
    assert receiver.wait_for(5)[-1]["kind"] == "give_up" and "not restarted" in receiver.bodies[-1]["text"]
    alerts.attempt_ended(_row("requeue", action="stop"))  # a requeue is routine: no alert
    assert alerter.drain(10.0) and len(receiver.bodies) == 5


def test_rate_limits_per_kind_and_per_hour(tmp_path, receiver):
    now = [0.0]
    alerter = Alerter(str(tmp_path / "r"), "rank0", AlertsConfig(min_interval_s=600, max_per_hour=3),
                      environ={WEBHOOK_ENV: receiver.url}, clock=lambda: now[0])
    assert alerter.send("hang", "first", node="n")
    assert not alerter.send("hang", "again within min_interval_s")
    assert alerter.send("stall", "another kind goes out")
    now[0] = 601.0
    assert alerter.send("hang", "after min_interval_s")
    assert not alerter.send("give_up", "4th within the hour")
    now[0] = 3700.0  # the first alerts are older than an hour
    assert alerter.send("give_up", "later")
    assert alerter.drain(10.0)
    bodies = receiver.wait_for(4)
    assert [b["kind"] for b in bodies] == ["hang", "stall", "hang", "give_up"]
    assert [b["held_back"] for b in bodies] == [0, 1, 0, 1]  # the next alert out tells of those held back
    assert "1 earlier alert(s) held back" in bodies[1]["text"]
    assert not Alerter(str(tmp_path), "x", AlertsConfig(), environ={}).send("hang", "no webhook set")


def test_unreachable_or_hanging_webhook_never_blocks_the_caller(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    slow = Receiver(delay_s=3.0)
    try:
        for url in (closed, slow.url):
            alerter = Alerter(str(tmp_path), "rank0", AlertsConfig(min_interval_s=0, timeout_s=0.5),
                              environ={WEBHOOK_ENV: url})
            started = time.perf_counter()
            for i in range(10):
                alerter.send(f"kind{i}", "x")
            assert time.perf_counter() - started < 0.1  # what a training step pays: nothing measurable
            deadline = time.monotonic() + 5.0
            while not alerter.failures and time.monotonic() < deadline:
                time.sleep(0.01)
            assert alerter.failures >= 1  # refused / timed out, logged, never raised
    finally:
        slow.server.shutdown()


def test_stall_and_skip_burst_alerts_from_rank0(tmp_path, receiver, monkeypatch):
    alerter = Alerter(str(tmp_path), "rank0", AlertsConfig(min_interval_s=0), environ={WEBHOOK_ENV: receiver.url})
    watch = StallWatch(alerter, stall_after_s=0.3, check_s=0.02)
    try:
        for step in range(1, 6):  # steps keep ending: no alert
            time.sleep(0.1)
            watch.progress(step)
        assert receiver.bodies == []
        bodies = receiver.wait_for(1)  # now no step ends
        time.sleep(0.5)  # one alert per stall, not one per check
        assert [b["kind"] for b in bodies] == ["stall"] and bodies[0]["last_step"] == 5
        assert "no training step has ended" in bodies[0]["text"]
    finally:
        watch.close()

    monkeypatch.setenv(WEBHOOK_ENV, receiver.url)
    from megatron_align.resilience.inrank.skip_step import SkipStep

    cfg = SkipStepConfig(enabled=True, max_consecutive=2)
    config = SimpleNamespace(run_dir=str(tmp_path / "burst"), resilience=SimpleNamespace(alerts=AlertsConfig()))
    trainer = SimpleNamespace(rank=0, run_dir=str(tmp_path), config=config, exit_code=None)
    trainer.stop = lambda reason, exit_code=None: setattr(trainer, "exit_code", exit_code)
    callback = SkipStep(cfg)
    callback._grad_norm = None
    for step in (1, 2, 3):
        callback.on_step_end(trainer, step, {"skipped_step": True, "loss": 9.0})
    bodies = receiver.wait_for(2)
    assert bodies[-1]["kind"] == "skip_burst" and bodies[-1]["step"] == 3 and bodies[-1]["run"] == "burst"
    assert trainer.exit_code == 87
