"""Megatron-LM checkpoints in both directions, against Megatron-LM's own checkpointing code.

The slow tests need ``megatron.training`` (shipped by megatron-core >= 0.17 wheels): on 0.16.1 they skip with
the reason. The refusal / envelope tests are plain unit tests and run on both stacks.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from megatron_align.convert import megatron_lm as mlm
from megatron_align.errors import UserError
from tests.conftest import REPO, run_cli, write_yaml

try:
    import megatron.training.checkpointing  # noqa: F401

    HAVE_MLM = True
except ImportError:
    HAVE_MLM = False
needs_mlm = pytest.mark.skipif(not HAVE_MLM, reason="this megatron-core wheel ships no megatron.training "
                                                    "(Megatron-LM's own checkpointing code arrives with 0.17+)")
HARNESS = os.path.join(REPO, "tests", "convert", "megatron_lm_reference.py")


def _ckpt(**args) -> mlm.MegatronLMCheckpoint:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, group_query_attention=True,
                ffn_hidden_size=192, seq_length=64, padded_vocab_size=512, normalization="RMSNorm", swiglu=True,
                position_embedding_type="rope", add_bias_linear=False, untie_embeddings_and_output_weights=True,
                kv_channels=16, rotary_base=500000, norm_epsilon=1e-6)
    return mlm.MegatronLMCheckpoint("/ckpt/iter_0000010", 10, False, {"args": argparse.Namespace(**{**base, **args})})


def test_args_map_to_model_config_and_unsupported_args_are_refused_by_name():
    model = mlm.model_config(_ckpt())
    assert model["num_query_groups"] == 2 and model["kv_channels"] is None and model["tie_embeddings"] is False
    assert (model["vocab_size"], model["make_vocab_size_divisible_by"], model["rotary_base"]) == (512, 1, 500000)
    for arg, value in (("num_experts", 8), ("multi_latent_attention", True), ("normalization", "LayerNorm"),
                       ("position_embedding_type", "learned_absolute"), ("swiglu", False)):
        with pytest.raises(UserError, match=f"{arg}={value!r}"):
            mlm.model_config(_ckpt(**{arg: value}))


def test_which_optimizer_states_load_and_why_not():
    """Megatron-LM's optimizer formats against this run's optimizer and layout (the rules of optimizer_refusal);
    the dp_reshardable load itself runs in tests/training/test_dist_opt.py."""
    ok = mlm.optimizer_refusal
    assert ok(None, (2, 2), (1, 4), distributed=False, fused_adam=False) is None  # plain state reshards TP/PP
    assert ok("dp_reshardable", (2, 1), (2, 1), distributed=True, fused_adam=False) is None  # any DP size
    assert ok("fully_reshardable", (2, 1), (1, 2), distributed=True, fused_adam=True) is None
    assert "optimizer.distributed=false" in ok(None, (1, 1), (1, 1), distributed=True, fused_adam=False)
    assert "optimizer.distributed=true" in ok("dp_reshardable", (1, 1), (1, 1), distributed=False, fused_adam=False)
    assert "parallel.tensor=2 parallel.pipeline=1" in ok("dp_reshardable", (2, 1), (1, 2), True, False)
    assert "fused Adam" in ok("fully_reshardable", (1, 1), (1, 1), distributed=True, fused_adam=False)
    assert "'dp_zero_gather_scatter'" in ok("dp_zero_gather_scatter", (1, 1), (1, 1), True, True)
    legacy = _ckpt(use_distributed_optimizer=True)  # megatron-core < 0.13: no content metadata, inferred from args
    assert mlm.optimizer_sharding(legacy) == "dp_zero_gather_scatter"
    assert mlm.optimizer_sharding(_ckpt()) is None


def test_scheduler_units_and_rng_layout_round_trip():
    ours = {"max_lr": 1e-3, "num_steps": 3, "lr_warmup_steps": 1, "lr_decay_steps": 8, "wd_incr_steps": 8,
            "lr_decay_style": "cosine"}
    samples = mlm.scheduler_to_samples(ours, 4)
    assert samples["num_steps"] == 12 and samples["lr_decay_steps"] == 32 and samples["max_lr"] == 1e-3
    assert mlm.scheduler_to_steps(samples, 4) == ours
    rng = {"random": 1, "numpy": 2, "torch": 3, "cuda": 4, "tracker": 5}
    assert mlm.rng_from_megatron_lm(mlm.rng_to_megatron_lm(rng), 0) == rng


def test_missing_tracker_and_bad_tracker_are_named(tmp_path):
    os.makedirs(tmp_path / "iter_0000002")
    (tmp_path / "iter_0000002" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    assert mlm.is_megatron_lm(str(tmp_path))
    with pytest.raises(UserError, match=f"{mlm.TRACKER}: missing tracker file.*iter_0000002"):
        mlm.resolve_dir(str(tmp_path))
    (tmp_path / mlm.TRACKER).write_text("7")
    with pytest.raises(UserError, match="names iteration 7"):
        mlm.resolve_dir(str(tmp_path))


def test_bridge_layout_gives_weights_config_and_train_state(tmp_path):
    """A synthesized Megatron-Bridge directory (Bridge is not installable here): run_config.yaml + train_state.pt."""
    it = tmp_path / "iter_0000005"
    os.makedirs(it)
    (it / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (it / mlm.BRIDGE_RUN_CONFIG).write_text(yaml.safe_dump({"model": {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 4, "ffn_hidden_size": 128,
        "seq_length": 32, "vocab_size": 512, "layernorm_epsilon": 1e-5, "normalization": "RMSNorm",
        "gated_linear_unit": True, "share_embeddings_and_output_weights": False, "add_bias_linear": False}}))
    torch.save({"step": torch.tensor(5), "consumed_train_samples": torch.tensor(40)}, it / mlm.BRIDGE_TRAIN_STATE)
    (tmp_path / mlm.TRACKER).write_text("5")
    bridge = mlm._read_bridge(str(it))
    ckpt = mlm.MegatronLMCheckpoint(str(it), 5, False, {}, bridge)
    model = mlm.model_config(ckpt)
    assert (model["num_layers"], model["ffn_hidden_size"], model["vocab_size"], model["tie_embeddings"]) == (
        2, 128, 512, False)
    assert ckpt.consumed_samples == 40
    bridge["model"]["num_moe_experts"] = 4
    bridge["model"]["num_experts"] = 4
    with pytest.raises(UserError, match="num_experts=4"):
        mlm.model_config(ckpt)


def _harness(*args: str) -> None:
    # A fresh environment as a user's Megatron-LM job has: models built in this pytest process (Megatron's
    # _set_attention_backend, attention_backend=auto) leave NVTE_*_ATTN=1 in os.environ, which the harness's
    # --attention-backend unfused refuses (AssertionError: NVTE_FLASH_ATTN set to 1, but expected 0).
    env = {k: v for k, v in os.environ.items() if not re.fullmatch(r"NVTE_(FLASH|FUSED|UNFUSED)_ATTN", k)}
    env["PYTHONPATH"] = REPO
    proc = subprocess.run([sys.executable, "-W", "ignore", HARNESS, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _logits_of(path: str, tokens: torch.Tensor) -> torch.Tensor:
    """This project's TP1 x PP1 model loaded from a Megatron-LM checkpoint (the convert path), on fixed tokens."""
    from megatron_align.convert.megatron_model import (
        build_gpt,
        load_checkpoint_into,
        megatron_logits,
        single_rank_config,
        single_rank_group,
    )

    ckpt = mlm.open_checkpoint(path)
    model_cfg = mlm.model_config(ckpt)
    config = single_rank_config(model_cfg, None, model_cfg["vocab_size"], model_cfg["vocab_size"])
    with single_rank_group(config):
        model = build_gpt(config, model_cfg["vocab_size"])
        load_checkpoint_into(model, ckpt.path)
        return megatron_logits(model, tokens)


@pytest.fixture(scope="module")
def megatron_lm_saved(tmp_path_factory):
    """Megatron-LM's save_checkpoint of a tiny GPT trained 2 steps on 2 gloo ranks, and its logits."""
    root = tmp_path_factory.mktemp("mlm")
    _harness("save", str(root / "ckpt"), str(root / "logits.pt"))
    return str(root / "ckpt"), torch.load(root / "logits.pt", weights_only=True)


@needs_mlm
@pytest.mark.slow
def test_megatron_lm_checkpoint_gives_the_saved_models_logits(megatron_lm_saved):
    ckpt_dir, reference = megatron_lm_saved
    torch.testing.assert_close(_logits_of(ckpt_dir, reference["tokens"]), reference["logits"], rtol=0, atol=1e-5)


@needs_mlm
@pytest.mark.slow
def test_reads_megatron_lm_checkpoint_and_continues_at_tp2_pp2(megatron_lm_saved, tiny_corpus, tmp_path):
    ckpt_dir, _ = megatron_lm_saved
    inspected = run_cli("checkpoint", "inspect", ckpt_dir)
    assert inspected.returncode == 0 and "iteration    2" in inspected.stdout and "optimizer state: yes" in \
        inspected.stdout, inspected.stdout + inspected.stderr
    # A run continues from it at TP2 x PP2 (weights resharded, optimizer + schedule + iteration from Megatron-LM),
    # and writes in Megatron-LM's format: Megatron-LM's own load_checkpoint resumes that one (next test).
    config = {"run_dir": str(tmp_path / "run"), "parallel": {"world_size": 4, "tensor": 2, "pipeline": 2},
              "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 1, "seed": 7},
              "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "clip_grad": 1.0},
              "data": {"sources": [{"name": "web", "prefix": tiny_corpus}]},
              "checkpoint": {"load": ckpt_dir, "format": "megatron_lm"}}
    result = run_cli("train", write_yaml(tmp_path / "train.yaml", config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resumed from Megatron checkpoint" in log and "at iteration 2" in log and "starts at sample 0" in log
    records = [yaml.safe_load(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3]
    assert (tmp_path / "run" / "checkpoints" / mlm.TRACKER).read_text().strip() == "3"


@needs_mlm
@pytest.mark.slow
def test_megatron_lm_resumes_our_checkpoint_with_the_same_next_losses(megatron_lm_saved, tiny_corpus, tmp_path):
    """We write Megatron-LM format at step 3; Megatron-LM's load_checkpoint + 2 steps == our own steps 4 and 5
    (the first checks the weights, the second the optimizer state and LR schedule)."""
    ckpt_dir, _ = megatron_lm_saved
    config = {"run_dir": str(tmp_path / "run"), "parallel": {"world_size": 2},
              "train": {"steps": 5, "global_batch_size": 4, "micro_batch_size": 1, "seed": 7},
              "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "clip_grad": 1.0},
              "data": {"sources": [{"name": "web", "prefix": tiny_corpus}]},
              "checkpoint": {"load": ckpt_dir, "format": "megatron_lm", "interval": 3, "keep_last": 5}}
    config_yaml = write_yaml(tmp_path / "train.yaml", config)
    result = run_cli("train", config_yaml)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ours = {r["step"]: r["loss"] for r in map(yaml.safe_load,
                                               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    ours_dir = tmp_path / "run" / "checkpoints"
    (ours_dir / mlm.TRACKER).write_text("3")  # Megatron-LM resumes from step 3, our run continued to 5
    _harness("resume", str(ours_dir), str(tmp_path / "resumed.pt"), str(tmp_path / "run" / "config.yaml"))
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert resumed["iteration"] == 3 and resumed["consumed_train_samples"] == 4
    assert resumed["losses"] == pytest.approx([ours[4], ours[5]], abs=1e-5)
    # Corrupt shard: a truncated file is named before anything is read.
    broken = tmp_path / "broken"
    shutil.copytree(ours_dir / "iter_0000003", broken / "iter_0000003")
    shard = sorted(p for p in (broken / "iter_0000003").iterdir() if p.suffix == ".distcp")[0]
    shard.write_bytes(shard.read_bytes()[:100])
    from megatron_align.training.megatron_lm_state import _check_shards

    with pytest.raises(UserError, match=f"{shard.name}: truncated"):
        _check_shards(str(broken / "iter_0000003"))
