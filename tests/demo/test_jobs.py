"""The demo's job runner: dependencies, slot limit, list-order priority, failure handling."""

import os
import sys
import time

import pytest

from megatron_align.demo.run import Job, run_jobs
from megatron_align.errors import UserError


def _job(name, tmp_path, seconds=0.0, code=0, needs=()):
    """A job that records its start and end times in <name>.times, then exits with ``code``."""
    script = (
        f"import time; s = time.time(); time.sleep({seconds}); "
        f"open({str(tmp_path / (name + '.times'))!r}, 'w').write(f'{{s}} {{time.time()}}'); raise SystemExit({code})"
    )
    return Job(name, [sys.executable, "-c", script], needs=tuple(needs))


def _times(tmp_path, name):
    start, end = map(float, (tmp_path / f"{name}.times").read_text().split())
    return start, end


def test_dependencies_and_slots_are_respected(tmp_path):
    jobs = [_job("pre", tmp_path, 0.6), _job("other", tmp_path, 0.2), _job("mid_a", tmp_path, 0.3, needs=["pre"]),
            _job("mid_b", tmp_path, 0.3, needs=["pre"]), _job("eval", tmp_path, needs=["mid_a", "other"])]
    done = []
    run_jobs(jobs, 2, str(tmp_path / "logs"), lambda job: done.append(job.name))
    assert sorted(done) == sorted(j.name for j in jobs) and done.index("eval") == len(done) - 1
    spans = {j.name: _times(tmp_path, j.name) for j in jobs}
    for name in ("mid_a", "mid_b"):
        assert spans[name][0] >= spans["pre"][1]
    assert spans["eval"][0] >= max(spans["mid_a"][1], spans["other"][1])
    events = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 2  # pre and other overlapped, and never more than two at once
    assert os.path.isfile(tmp_path / "logs" / "mid_a.log")


def test_a_failure_stops_the_running_jobs_and_names_the_log(tmp_path):
    jobs = [_job("slow", tmp_path, 30), _job("bad", tmp_path, 0.2, code=3), _job("after", tmp_path, needs=["bad"])]
    started = time.time()
    with pytest.raises(UserError, match=r"demo job bad failed with exit code 3; see .*bad\.log"):
        run_jobs(jobs, 2, str(tmp_path / "logs"))
    assert time.time() - started < 20  # the slow job was terminated, not waited for
    assert not (tmp_path / "after.times").exists() and not (tmp_path / "slow.times").exists()


def test_a_dependency_on_a_later_job_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs"):
        run_jobs([_job("a", tmp_path, needs=["b"]), _job("b", tmp_path)], 1, str(tmp_path / "logs"))
