"""Retention and resume-selection rules of the checkpoint directory (no training needed)."""

import json

from megatron_align.training.checkpoint_files import MARKER, complete_checkpoints, resolve_checkpoint, retained


def test_retention_keeps_last_n_every_kth_and_always_the_newest():
    steps = [100, 200, 300, 400, 500, 600]
    assert retained(steps, keep_last=2, keep_every=None) == {500, 600}
    assert retained(steps, keep_last=2, keep_every=300) == {300, 500, 600}
    assert retained([700], keep_last=1, keep_every=1000) == {700}
    assert retained([], keep_last=3, keep_every=None) == set()


def _fake(root, step, complete=True):
    path = root / f"iter_{step:07d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    if complete:
        (path / MARKER).write_text(json.dumps({"step": step}))
    return path


def test_resume_picks_newest_complete_and_ignores_partial_and_tmp(tmp_path):
    _fake(tmp_path, 2)
    _fake(tmp_path, 4)
    _fake(tmp_path, 6, complete=False)  # crashed before its marker
    (tmp_path / ".tmp_iter_0000008").mkdir()
    (tmp_path / "latest").write_text("iter_0000002\n")  # lags behind a completed rename
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [2, 4]
    assert resolve_checkpoint(str(tmp_path)).endswith("iter_0000004")
    assert resolve_checkpoint(str(tmp_path / "iter_0000002")).endswith("iter_0000002")
    assert resolve_checkpoint(str(tmp_path / "nothing")) is None


def test_an_unreadable_marker_is_a_checkpoint_load_error_naming_the_directory(tmp_path):
    import pytest

    from megatron_align.errors import UserError
    from megatron_align.training.checkpoint_files import CheckpointLoadError, read_marker

    ckpt = tmp_path / "iter_0000004"
    ckpt.mkdir()
    (ckpt / MARKER).write_text('{"step": 4, "consu')  # torn
    with pytest.raises(CheckpointLoadError, match="unreadable checkpoint marker") as info:
        read_marker(str(ckpt))
    assert info.value.path == str(ckpt) and isinstance(info.value, UserError)
