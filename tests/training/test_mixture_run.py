"""A two-phase alignment mixture, trained for real: per-source counts follow the schedule, resume is exact."""

import pytest
from conftest import run_cli, tiny_config, write_yaml

from megatron_align.training.metrics import read_metrics


def write_text(path, text):
    path.write_text(text)
    return str(path)


pytestmark = pytest.mark.slow


def _config(tmp_path, name, web, aligned, **extra):
    data = {
        "heldout_percent": 10.0,
        "heldout_interval": 2,
        "sources": [{"name": "web", "prefix": web}, {"name": "aligned", "prefix": aligned}],
        "mixture": {
            "block_size": 8,
            "phases": [
                {"name": "pretrain", "fraction": 0.5, "weights": {"web": 1.0}},
                {"name": "midtrain", "fraction": 0.5, "weights": {"web": 0.75, "aligned": 0.25}},
            ],
            "max_repetitions": {"aligned": 4.0, "web": 4.0},
        },
    }
    cfg = tiny_config(tmp_path / name, web, data=data, train={"steps": 4, "global_batch_size": 4}, **extra)
    return write_yaml(tmp_path / f"{name}.yaml", cfg)


def test_two_phase_counts_resume_with_new_dp_and_fingerprint(tmp_path, tiny_corpus, second_corpus):
    straight = _config(tmp_path, "straight", tiny_corpus, second_corpus)
    result = run_cli("train", straight, "checkpoint.interval=0")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    # 16 samples: phase boundary at sample 8; each block of 8 in midtrain is exactly 6 web + 2 aligned.
    assert [r["phase"] for r in records] == ["pretrain", "pretrain", "midtrain", "midtrain"]
    assert [(r["samples/web"], r["samples/aligned"]) for r in records] == [(4, 0), (8, 0), (11, 1), (14, 2)]
    assert records[-1]["tokens/aligned"] == 2 * 64
    assert "phase boundary: pretrain -> midtrain" in result.stdout
    held = [(r["step"], r.get("heldout_loss/web"), r.get("heldout_loss/aligned")) for r in records]
    assert [h[0] for h in held if h[1] is not None] == [2, 4]
    assert all(0 < h[1] < 10 and 0 < h[2] < 10 for h in held if h[1] is not None)
    assert held[3][1] < held[1][1]  # the model learns: held-out loss on web falls between step 2 and 4

    split = _config(tmp_path, "split", tiny_corpus, second_corpus)
    result = run_cli("train", split, "train.stop_at_step=3")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("train", split, "parallel.world_size=2")  # resume on a different data-parallel size
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = read_metrics(tmp_path / "split" / "metrics.jsonl")
    keys = ("step", "phase", "samples/web", "samples/aligned", "consumed_samples")
    assert resumed[3]["heldout_loss/aligned"] == pytest.approx(records[3]["heldout_loss/aligned"], rel=1e-5)
    assert [tuple(r[k] for k in keys) for r in resumed] == [tuple(r[k] for k in keys) for r in records]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in records], rel=1e-5)

    # A changed schedule would silently change the sample sequence: refused, naming the switch.
    changed = (tmp_path / "split.yaml").read_text().replace("aligned: 0.25", "aligned: 0.5")
    result = run_cli("train", write_text(tmp_path / "changed.yaml", changed))
    assert result.returncode == 2
    assert "allow_fingerprint_change" in result.stderr
