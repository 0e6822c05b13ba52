"""NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE is set only while a checkpoint whose checksums verified is loaded."""

from __future__ import annotations

import json
import os

import pytest

from megatron_align.training.checkpoint import MARKER, TE_PICKLE_ENV, te_extra_state_unpickling


def test_window_sets_the_variable_only_when_verified_and_restores_it(monkeypatch):
    monkeypatch.delenv(TE_PICKLE_ENV, raising=False)
    with te_extra_state_unpickling(False):
        assert TE_PICKLE_ENV not in os.environ
    with te_extra_state_unpickling(True):
        assert os.environ[TE_PICKLE_ENV] == "1"
    assert TE_PICKLE_ENV not in os.environ
    monkeypatch.setenv(TE_PICKLE_ENV, "0")  # the user's own choice comes back afterwards
    with pytest.raises(RuntimeError), te_extra_state_unpickling(True):
        raise RuntimeError("load failed")
    assert os.environ[TE_PICKLE_ENV] == "0"


def test_real_load_of_verified_and_unverified_checkpoints(tmp_path, monkeypatch, gloo_group):
    """A real save/load on one gloo rank: the model-load callback sees the variable for the checkpoint with
    checksums, not for the same checkpoint once its marker carries none."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_align.parallel import cpu
    from megatron_align.training.checkpoint import CheckpointManager

    monkeypatch.delenv(TE_PICKLE_ENV, raising=False)
    if not torch.cuda.is_available():
        cpu.activate()
    manager = CheckpointManager(str(tmp_path / "ckpt"), keep_last=5, keep_every=None, async_save=False)
    manager.save(1, {"w": ShardedTensor.from_rank_offsets("w", torch.arange(8.0), replica_id=0)}, {})
    path = str(tmp_path / "ckpt" / "iter_0000001")
    seen = []

    def load(path):
        template = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(8), replica_id=0)}
        state = manager.load(path, template, lambda state: seen.append(os.environ.get(TE_PICKLE_ENV)))
        assert torch.equal(state["w"], torch.arange(8.0))

    load(path)
    marker_path = os.path.join(path, MARKER)
    marker = json.loads(open(marker_path).read())
    assert marker["checksums"]["files"]
    marker.pop("checksums")
    with open(marker_path, "w") as f:
        json.dump(marker, f)
    load(path)
    assert seen == ["1", None] and TE_PICKLE_ENV not in os.environ
