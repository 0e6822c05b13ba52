"""``--executor ray``: datatrove's RayPipelineExecutor on a local Ray started by our own start-up code gives the
local executor's bytes for prepare and filter, and a failed Ray task stops the run naming its log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("datatrove")
pytest.importorskip("ray")

from megatron_align.cli import main  # noqa: E402
from megatron_align.config.corpus import PipelineRayConfig  # noqa: E402
from megatron_align.corpus.pipeline_ray import ray_session  # noqa: E402
from tests.corpus.test_pipeline import manifest, read_all, write_corpus  # noqa: E402

# Base stack only: Ray and datatrove code, nothing megatron-core-version dependent (the tokenizer + builder path is
# covered on both stacks by test_pipeline.py); a Ray start plus task processes costs ~30 s on an idle 2-core box.
pytestmark = [pytest.mark.slow, pytest.mark.single_stack]


def _report(path: Path) -> dict:
    report = json.loads((path / "report.json").read_text())
    for key in ("seconds", "mb_per_s", "outputs"):
        report.pop(key)
    return report


def test_ray_executor_gives_the_local_bytes_and_reports_a_failed_task(tmp_path, capsys):
    import ray

    inputs = [str(p) for p in write_corpus(tmp_path / "in", num_files=3)]
    local = ["--executor", "local", "--tasks", "2", "--workers", "1"]
    assert main(["prepare", *inputs, "--output-prefix", str(tmp_path / "local" / "web"), *local]) == 0
    assert main(["filter", *inputs, "--out-dir", str(tmp_path / "local" / "f"), "--policy", "resample", *local]) == 0
    capsys.readouterr()
    on_ray = ["--executor", "ray", "--tasks", "2", "--workers", "2"]
    # one local Ray for the three runs, started the way `--executor ray` starts one (2 CPUs: both tasks at once)
    with ray_session(PipelineRayConfig(), tasks=2, workers=2):
        assert ray.cluster_resources()["CPU"] == 2
        assert main(["prepare", *inputs, "--output-prefix", str(tmp_path / "ray" / "web"), *on_ray]) == 0
        assert main(["filter", *inputs, "--out-dir", str(tmp_path / "ray" / "f"), "--policy", "resample", *on_ray]) == 0
        err = capsys.readouterr().err
        strict = main(["filter", *inputs, "--out-dir", str(tmp_path / "strict"), "--strict", *on_ray])
        failed = capsys.readouterr().err
    assert not ray.is_initialized()  # stopped after the run
    assert read_all(tmp_path / "ray" / "web") == read_all(tmp_path / "local" / "web")
    assert manifest(tmp_path / "ray" / "web") == manifest(tmp_path / "local" / "web")
    for name in ("kept.jsonl", "flagged.jsonl"):
        assert (tmp_path / "ray" / "f" / name).read_bytes() == (tmp_path / "local" / "f" / name).read_bytes()
    assert _report(tmp_path / "ray" / "f") == _report(tmp_path / "local" / "f")
    assert re.search(r"prepare \(3 files\): 100\.0% of [\d.]+ kB, 120 docs, [\d.]+ MB/s, [\d,]+ tokens", err)
    # --strict: the task that meets a bad line fails inside Ray (datatrove only logs it); the run must not pass
    assert strict == 2
    assert re.search(
        r"filter: \d of 2 pipeline tasks did not finish \(first: task \d, log .*task_0000\d\.log\)", failed
    )
    assert not (tmp_path / "strict" / "report.json").exists()


def test_an_address_nobody_answers_fails_at_once():
    from megatron_align.errors import UserError

    with pytest.raises(UserError, match=r"ray.address='127.0.0.1:1': nothing answers there"):
        with ray_session(PipelineRayConfig(address="127.0.0.1:1"), tasks=2, workers=2):
            pass  # ray.init would retry this address for minutes
