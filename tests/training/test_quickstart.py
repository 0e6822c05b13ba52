"""The README Quickstart's main job (`make tiny` = generate the tiny corpus + train examples/tiny_cpu.yaml),
end to end."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

from megatron_align.training.checkpoint import resolve_checkpoint
from megatron_align.training.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_tiny_example_trains_and_loss_goes_down(tmp_path):
    data = tmp_path / "tiny"
    made = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_tiny_corpus.py"), str(data)],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    result = run_cli("train", os.path.join(REPO, "examples", "tiny_cpu.yaml"), f"run_dir={tmp_path / 'run'}",
                     f"data.sources=[{{name: web, prefix: {data / 'web'}}}]")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["step"] == 60
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]  # byte-level text: ~6.2 -> well under 3.7
    for key in ("step", "loss", "lr", "grad_norm", "consumed_samples", "tokens", "step_time_s", "tokens_per_s"):
        assert key in records[-1]
    assert resolve_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("iter_0000060")
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "train.log").is_file()
    assert "step 60/60" in result.stdout
