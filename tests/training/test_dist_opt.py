"""Megatron-Core's DistributedOptimizer on CPU/gloo: it trains, checkpoints and resumes exactly, also across DP sizes.

The GPU's default optimizer path (``optimizer.distributed=auto`` is on with CUDA), tested without a GPU: torch Adam
(no TE/apex here), the ``dp_reshardable`` checkpoint format, the load template of a fresh optimizer.
"""

from __future__ import annotations

import pytest
from conftest import run_cli, tiny_config, write_yaml

from megatron_align.training.metrics import read_metrics

pytestmark = pytest.mark.slow


def _train(tmp_path, name, corpus, world_size, *overrides):
    config = tiny_config(tmp_path / name, corpus, parallel={"world_size": world_size},
                         optimizer={"distributed": "true"})
    result = run_cli("train", write_yaml(tmp_path / f"{name}.yaml", config), *overrides)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(tmp_path / name / "metrics.jsonl")}


def test_distributed_optimizer_resumes_exactly_on_2_and_4_ranks_and_across_dp(tmp_path, tiny_corpus):
    """DP2 4 steps (checkpoint at 2, in Megatron-LM's envelope) == DP2 resumed at 2 through the Megatron-LM reader
    (the 'dp_reshardable' DistributedOptimizer state Megatron-LM writes by default), bit for bit; DP2's step-2
    checkpoint continued on DP4 through our own reader gives the same losses (to reduction order); DP4 resumed
    from its own step-3 checkpoint == DP4 straight."""
    straight = _train(tmp_path, "dp2", tiny_corpus, 2, "checkpoint.format=megatron_lm")
    assert sorted(straight) == [1, 2, 3, 4] and straight[4][0] < straight[1][0]
    dp2_ckpt = tmp_path / "dp2" / "checkpoints" / "iter_0000002"

    (tmp_path / "dp2" / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = _train(tmp_path, "dp2_resumed", tiny_corpus, 2, f"checkpoint.load={tmp_path / 'dp2' / 'checkpoints'}",
                     "checkpoint.data_position=continue")
    log = (tmp_path / "dp2_resumed" / "train.log").read_text()
    assert "resumed from Megatron checkpoint" in log and "at iteration 2" in log
    assert resumed == {s: straight[s] for s in (3, 4)}  # step 4 needs Adam's moments and step count restored

    dp4 = _train(tmp_path, "dp4", tiny_corpus, 4, f"checkpoint.load={dp2_ckpt}", "checkpoint.interval=1")
    assert sorted(dp4) == [3, 4]
    for step in (3, 4):
        assert dp4[step][0] == pytest.approx(straight[step][0], rel=1e-6), step
        assert dp4[step][1] == pytest.approx(straight[step][1], rel=1e-5), step
    dp4_resumed = _train(tmp_path, "dp4_resumed", tiny_corpus, 4,
                         f"checkpoint.load={tmp_path / 'dp4' / 'checkpoints' / 'iter_0000003'}")
    assert dp4_resumed == {4: dp4[4]}
