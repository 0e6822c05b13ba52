"""A checkpoint written on one stack resumes exactly on the other (Python 3.11 + megatron-core 0.16.1 and
Python 3.12 + 0.19.x, see stacks.env), in both directions.

The other stack's interpreter comes from ``MA_OTHER_STACK_PYTHON`` (a venv with this project installed);
``make test-cross-stack`` and ``.ci/run`` set it. Without it the test skips locally, but under
``MA_REQUIRE_CROSS_STACK=1`` (CI) a missing or broken other stack is a failure, never a skip.
"""

from __future__ import annotations

import math
import os
import subprocess

import pytest
from conftest import run_cli, tiny_config, write_yaml

from megatron_align.training.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.single_stack]

OTHER_ENV = "MA_OTHER_STACK_PYTHON"
REQUIRE_ENV = "MA_REQUIRE_CROSS_STACK"
_VERSIONS = (
    "import sys, importlib.metadata as m, megatron_align; print(sys.version.split()[0], m.version('megatron-core'))"
)


def _versions(python: str) -> tuple[str, str]:
    out = subprocess.run([python, "-c", _VERSIONS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{OTHER_ENV}={python} cannot import megatron_align: {out.stderr[-2000:]}"
    py, mcore = out.stdout.split()
    return py, mcore


@pytest.fixture(scope="module")
def other_python() -> str:
    python = os.environ.get(OTHER_ENV)
    if not python:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {OTHER_ENV} is not set: the cross-stack test must run in CI")
        pytest.skip(f"{OTHER_ENV} not set (point it at the other stack's venv python; make test-cross-stack does)")
    assert os.path.isfile(python), f"{OTHER_ENV}={python}: no such interpreter"
    return python


def _train(python, run, corpus, steps, load=None):
    ckpt = {"interval": 2, "keep_last": 5} | ({"load": str(load)} if load else {})
    # One LR schedule for all three runs whatever their train.steps (a resume follows the config's schedule,
    # config/schedule.py): the runs differ only in which stack wrote the checkpoint they continue.
    path = write_yaml(run.parent / f"{run.name}.yaml", tiny_config(run, corpus, train={"steps": steps}, checkpoint=ckpt,
                                                                   optimizer={"decay_steps": 6}))
    result = run_cli("train", path, python=python)
    assert result.returncode == 0, f"{python}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}, result


def test_checkpoints_resume_exactly_across_stacks(tmp_path, tiny_corpus, other_python):
    """This stack trains 6 steps (reference). The other stack resumes this stack's step-2 checkpoint to step 4;
    this stack resumes the other stack's step-4 checkpoint to step 6. Weights, optimizer, scheduler and data
    position all cross: the losses continue the reference."""
    import importlib.metadata
    import sys

    here = (sys.version.split()[0], importlib.metadata.version("megatron-core"))
    there = _versions(other_python)
    assert there[1] != here[1], f"{OTHER_ENV} has the same megatron-core ({here[1]}) as this stack"

    reference, _ = _train(sys.executable, tmp_path / "reference", tiny_corpus, 6)
    assert sorted(reference) == list(range(1, 7))
    there_losses, out = _train(other_python, tmp_path / "there", tiny_corpus, 4,
                               load=tmp_path / "reference" / "checkpoints" / "iter_0000002")
    assert sorted(there_losses) == [3, 4], (there, out.stdout[-2000:])
    back, out = _train(sys.executable, tmp_path / "back", tiny_corpus, 6,
                       load=tmp_path / "there" / "checkpoints" / "iter_0000004")
    assert sorted(back) == [5, 6], out.stdout[-2000:]
    for step, loss in {**there_losses, **back}.items():
        assert math.isclose(loss, reference[step], rel_tol=1e-4), (step, loss, reference[step], here, there)
