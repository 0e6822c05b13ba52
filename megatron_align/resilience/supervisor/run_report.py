"""Goodput of a supervised run: how much of the wall clock turned into training that was kept.

What: ``goodput = productive time / wall time`` of one `megatron-align launch`, where productive
time is the sum of ``step_time_s`` over the steps in the final ``metrics.jsonl`` that this launch
trained (the trainer truncates records past the checkpoint it resumes from, so steps lost to a
failure are not in the file: they were recomputed, and only the surviving copy counts). The rest
of the wall clock is start-up, checkpoint saves, lost steps, failure detection, teardown,
backoff and restarts. Also measured per restart: the time from the failure to the first step the
next attempt completed (the restart latency).

How it relates to :mod:`megatron_align.parallel.goodput` (the planning model): the report
feeds the measured checkpoint save time, restart latency and step time into the Young/Daly
model and prints the goodput-optimal checkpoint interval next to the configured one when they
differ by more than 2x, at the Llama 3 failure rate for this many GPUs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from megatron_align.config import RootConfig
from megatron_align.fileio import atomic_write_json
from megatron_align.parallel.goodput import FailureModel, expected_goodput, optimal_interval


class RunReport:
    def __init__(self, config: RootConfig, start_step: int) -> None:
        self.config = config
        self.start_step = start_step
        self.started = time.time()
        self.steps_lost = 0
        self.restarts: list[dict] = []
        self.attempt = 0
        self.startup_s: float | None = None
        self.excluded: list[str] = []
        """Nodes no attempt uses (the supervisor's list, shared)."""
        self.detected_at: float | None = None
        self.torn_down_at: float | None = None
        self._checkpoint_s: dict[tuple, float] = {}  # (pid, step) -> save seconds seen on rank 0

    def attempt_started(self, attempt: int) -> None:
        self.attempt = attempt
        self._attempt_started = time.time()
        if self.restarts and self.restarts[-1].get("restarted_at") is None:
            self.restarts[-1]["restarted_at"] = self._attempt_started

    def failure(self, attempt: int, cause: str, failed_at: float) -> None:
        self.restarts.append(
            {
                "attempt": attempt,
                "cause": cause,
                "failed_at": failed_at,
                "detected_at": self.detected_at,
                "torn_down_at": self.torn_down_at,
                "restarted_at": None,
                "recovered_at": None,
            }
        )
        self.detected_at = self.torn_down_at = None

    def observe_beats(self, beats: dict[int, dict]) -> None:
        now = time.time()
        beat0 = beats.get(0)
        if beat0 and beat0.get("checkpoint_s"):
            self._checkpoint_s[(beat0.get("pid"), beat0.get("completed_step"))] = float(beat0["checkpoint_s"])
        done = [b for b in beats.values() if b.get("attempt") == self.attempt and b.get("steps_done", 0) >= 1]
        if not done:
            return
        # The first completed step of this attempt: its own timestamp when we caught it exactly.
        first = min(b["time"] if b.get("steps_done") == 1 else now for b in done)
        if self.startup_s is None and self.attempt == 0:
            self.startup_s = first - self.started
        pending = self.restarts[-1] if self.restarts else None
        if pending and pending["attempt"] == self.attempt - 1 and pending["recovered_at"] is None:
            pending["recovered_at"] = first
            # Start-up of the new attempt, from its ranks' heartbeats: processes started, process group joined
            # (rendezvous done), training started (model built, checkpoint loaded).
            mine = [b for b in beats.values() if b.get("attempt") == self.attempt]
            for key in ("process_started", "joined", "train_started"):
                times = [float(b[key]) for b in mine if b.get(key)]
                pending[f"{key}_at"] = max(times) if times else None

    # -- the end --------------------------------------------------------------------------------
    def _productive(self) -> tuple[float, int, int]:
        """(seconds, steps, final step) of steps trained by this launch that survive in metrics.jsonl."""
        path = os.path.join(self.config.run_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return 0.0, 0, self.start_step
        with open(path) as f:
            records = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r.get("step", 0))
        seconds, prev = 0.0, self.start_step
        for record in records:
            step = int(record.get("step", 0))
            if step > prev:  # one record per logging interval stands for the steps since the previous one
                seconds += float(record.get("step_time_s", 0.0)) * (step - prev)
                prev = step
        return seconds, prev - self.start_step, prev

    def _interval_advice(self, mean_step_s: float, save_s: float | None, recovery_s: float | None) -> dict | None:
        interval = self.config.checkpoint.interval
        if not interval or not save_s or mean_step_s <= 0:
            return None
        model = FailureModel(num_gpus=self.config.parallel.world_size, save_s=save_s, restore_s=0.0,
                             restart_s=recovery_s or self.startup_s or 0.0)
        configured_s = interval * mean_step_s
        best_s = optimal_interval(model)
        return {"configured_s": configured_s, "configured_steps": interval, "optimal_s": best_s,
                "optimal_steps": max(1, round(best_s / mean_step_s)), "mtbf_hours_per_gpu": model.mtbf_hours_per_gpu,
                "num_gpus": model.num_gpus, "save_s": save_s, "recovery_s": model.recovery_s,
                "expected_goodput_configured": expected_goodput(model, configured_s),
                "expected_goodput_optimal": expected_goodput(model, best_s)}

    def finish(self, exit_code: int, outcome: str, final_checkpoint_step: int) -> str:
        wall = time.time() - self.started
        productive, steps, final_step = self._productive()
        saves = list(self._checkpoint_s.values())
        save_s = sum(saves) / len(saves) if saves else None
        latencies = [r["recovered_at"] - r["failed_at"] for r in self.restarts if r.get("recovered_at")]
        recovery_s = sum(latencies) / len(latencies) if latencies else None
        mean_step = productive / steps if steps else 0.0
        advice = self._interval_advice(mean_step, save_s, recovery_s)
        report = {
            "outcome": outcome,
            "exit_code": exit_code,
            "wall_s": wall,
            "productive_s": productive,
            "goodput": productive / wall if wall > 0 else 0.0,
            "start_step": self.start_step,
            "final_step": final_step,
            "final_checkpoint_step": final_checkpoint_step,
            "steps_trained": steps,
            "steps_lost": self.steps_lost,
            "num_restarts": len(self.restarts),
            "startup_s": self.startup_s,
            "mean_step_s": mean_step,
            "checkpoint_save_s": save_s,
            "restart_latency_s": recovery_s,
            "restarts": [
                dict(r, failure_to_first_step_s=(r["recovered_at"] - r["failed_at"]) if r["recovered_at"] else None)
                for r in self.restarts
            ],
            "checkpoint_interval": advice,
        }
        report["excluded_nodes"] = list(self.excluded)
        try:
            atomic_write_json(os.path.join(self.config.run_dir, "goodput.json"), report)
        except OSError as err:  # a full run dir: the summary below still goes to stdout
            print(f"megatron-align launch: cannot write goodput.json ({err})", file=sys.stderr, flush=True)
        causes = ", ".join(r["cause"] for r in self.restarts) or "none"
        lines = [f"megatron-align launch: {outcome} (exit {exit_code})",
                 f"  steps {self.start_step} -> {final_step}, {len(self.restarts)} restart(s) [{causes}], "
                 f"{self.steps_lost} step(s) lost",
                 f"  goodput {report['goodput']:.3f}: {productive:.1f} s of kept training steps in {wall:.1f} s wall"]
        if self.excluded:
            lines.append(
                f"  excluded nodes: {', '.join(self.excluded)} "
                f"(kept in {os.path.join(self.config.run_dir, 'exclude_nodes.txt')})"
            )
        if recovery_s is not None:
            lines.append(f"  restart latency (failure -> next completed step): {recovery_s:.1f} s on average")
        if advice and not 0.5 <= advice["optimal_s"] / advice["configured_s"] <= 2.0:
            lines.append(
                f"  checkpoint.interval={advice['configured_steps']} steps ~ {advice['configured_s']:.0f} s "
                f"of training; at the Llama 3 failure rate on {advice['num_gpus']} GPU(s), "
                f"with saves of {advice['save_s']:.1f} s and restarts "
                f"of {advice['recovery_s']:.0f} s, the goodput-optimal interval is ~{_human(advice['optimal_s'])} "
                f"(~{advice['optimal_steps']} steps): expected goodput {advice['expected_goodput_optimal']:.4f} vs "
                f"{advice['expected_goodput_configured']:.4f} (see `megatron-align plan goodput`)"
            )
        lines.append(f"  details: {os.path.join(self.config.run_dir, 'goodput.json')}, restarts.jsonl")
        return "\n".join(lines)


def last_logged_step(path: str, tail_bytes: int = 65536) -> int:
    """The step of the newest complete record in a metrics file (0 if none), reading only its tail."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            continue  # a torn last line, or the cut-off first line of the tail
    return 0


def _human(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "never"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
