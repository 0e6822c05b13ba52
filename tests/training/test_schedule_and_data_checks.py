"""Values Megatron-Core only asserts on get our message first (issue 15, item 5), the LR schedule on resume
follows the config or refuses (optimizer.override_scheduler), and damaged .idx/.bin pairs name the file."""

from __future__ import annotations

import math
import os
import shutil

import pytest
from conftest import run_cli, tiny_config, write_yaml

from megatron_align.config import load_config
from megatron_align.config.schedule import resolve_schedule
from megatron_align.corpus.indexed import check_indexed_files
from megatron_align.errors import ConfigError, UserError
from megatron_align.training.metrics import read_metrics


def _config(tmp_path, corpus, *overrides):
    return load_config(write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", corpus)),
                       [o.replace("CORPUS", corpus) for o in overrides])


# -- each audited Megatron-Core assert, reached by a config ----------------------------------------
@pytest.mark.parametrize(
    "overrides, key",
    [
        (
            ["optimizer.warmup_steps=4", "optimizer.decay_steps=4"],
            "optimizer.warmup_steps=4 must be < optimizer.decay_steps=4",
        ),
        (
            ["optimizer.decay_style=WSD", "optimizer.wsd_decay_steps=4", "optimizer.warmup_steps=1"],
            "optimizer.wsd_decay_steps=4 exceeds the 3 steps after warmup (train.steps=4",
        ),
        (["optimizer.min_lr=0.1"], "optimizer.min_lr=0.1 exceeds optimizer.lr"),  # max_lr >= min_lr
        (["optimizer.min_lr=-1"], "optimizer.min_lr=-1"),  # min_lr >= 0
        (["optimizer.decay_steps=0"], "optimizer.decay_steps=0"),  # lr_decay_steps > 0
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1"),  # start_wd >= 0
        (["optimizer.adam_beta2=1.0"], "optimizer.adam_beta2=1.0: must be in [0, 1)"),  # torch Adam ValueError
        (["optimizer.adam_eps=0"], "optimizer.adam_eps=0"),
        (
            ["data.sources=[{name: web, prefix: CORPUS, weight: 0}]"],
            "data.sources[*].weight: all zero",
        ),  # blend normalisation
    ],
)
def test_megatron_core_asserts_are_our_config_errors(tmp_path, tiny_corpus, overrides, key):
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, tiny_corpus, *overrides)
    assert key in str(err.value)


def test_warmup_longer_than_a_short_run_is_clipped_with_a_warning(tmp_path, tiny_corpus):
    config = _config(tmp_path, tiny_corpus, "train.steps=2", "optimizer.warmup_steps=5")
    kwargs, notes = resolve_schedule(config.optimizer, config.train.steps)
    assert kwargs["lr_warmup_steps"] == 1 and kwargs["lr_decay_steps"] == 2
    assert notes == ["optimizer.warmup_steps=5 is not shorter than the run (train.steps=2, the decay length while "
                     "optimizer.decay_steps is unset): warmup clipped to 1 steps"]


@pytest.mark.slow
def test_resume_with_more_steps_follows_the_new_schedule_or_refuses(tmp_path, tiny_corpus):
    """2 steps, then train.steps=4: LR follows a straight 4-step cosine (logged); override_scheduler=false refuses."""
    run = tmp_path / "run"
    path = write_yaml(tmp_path / "c.yaml", tiny_config(run, tiny_corpus, train={"steps": 2}))
    assert run_cli("train", path).returncode == 0
    refused = run_cli("train", path, "train.steps=4", "optimizer.override_scheduler=false")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "optimizer.decay_steps (default train.steps): 2 in the checkpoint -> 4" in refused.stderr
    assert "optimizer.override_scheduler=true" in refused.stderr and "Traceback" not in refused.stderr

    followed = run_cli("train", path, "train.steps=4")
    assert followed.returncode == 0, followed.stderr[-3000:]
    assert "LR schedule follows this config" in followed.stdout + followed.stderr
    lrs = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl")}
    # warmup 1, cosine 1e-3 -> 1e-4 over 4 steps (Megatron-Core's formula), not min_lr as before
    expected = {s: 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 3)) for s in (3, 4)}
    assert lrs[3] == pytest.approx(expected[3]) and lrs[4] == pytest.approx(expected[4]) and lrs[3] > 2e-4


# -- damaged data files ----------------------------------------------------------------------------
@pytest.fixture
def pair(tmp_path, tiny_corpus):
    prefix = str(tmp_path / "web")
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_corpus + ext, prefix + ext)
    return prefix


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_good_pair_passes_and_each_damage_names_the_file(pair, second_corpus):
    check_indexed_files(pair, vocab_size=257)
    idx, bin_path = pair + ".idx", pair + ".bin"
    original = open(idx, "rb").read()

    _patch(idx, 0, b"XXIDIDX\x00\x00")
    with pytest.raises(UserError, match=rf"{idx}: not a Megatron IndexedDataset index \(wrong magic"):
        check_indexed_files(pair)
    open(idx, "wb").write(original[: len(original) // 2])
    with pytest.raises(UserError, match=rf"{idx}: truncated"):
        check_indexed_files(pair)
    open(idx, "wb").write(original)
    os.truncate(bin_path, os.path.getsize(bin_path) - 10)
    with pytest.raises(UserError, match=rf"{bin_path}: .* bytes, but {idx} says .* \(truncated .bin\)"):
        check_indexed_files(pair)
    with open(bin_path, "ab") as f:  # longer than its index says: a .bin of another run
        f.write(b"\0" * 100)
    with pytest.raises(UserError, match=rf"{bin_path}: .*different runs"):
        check_indexed_files(pair)
    with pytest.raises(
        UserError, match=rf"{second_corpus}.idx: tokens stored as uint16, which cannot hold .*100000 ids"
    ):
        check_indexed_files(second_corpus, vocab_size=100_000)


def test_train_names_the_damaged_idx_before_any_rank_starts(tmp_path, pair):
    _patch(pair + ".idx", 0, b"\0" * 9)
    result = run_cli("train", write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", pair)))
    assert result.returncode == 2 and f"{pair}.idx: not a Megatron IndexedDataset index" in result.stderr
    assert "AttributeError" not in result.stderr and not (tmp_path / "run").exists()  # no rank ever started
