"""FP8: config -> TransformerConfig for each recipe, and every refusal, on CPU; the FP8 runs themselves on a GPU.

The hardware facts (compute capability, TE version) are passed explicitly as an ``FP8Environment``
so every branch of the checks runs here; on a real machine ``FP8Environment.probe()`` supplies them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_cli, tiny_config, write_yaml
from megatron.core.enums import Fp8Recipe

from megatron_align.config import load_config
from megatron_align.errors import ConfigError, UserError
from megatron_align.model.builder import build_transformer_config, resolve_precision, resolve_spec
from megatron_align.model.fp8 import (
    FP8Environment,
    fp8_ddp_kwargs,
    fp8_transformer_kwargs,
    supported_recipes,
    validate_fp8,
)
from megatron_align.optional import have_te

H100 = FP8Environment((9, 0), "2.5.0", "NVIDIA H100 80GB HBM3")
B200 = FP8Environment((10, 0), "2.5.0", "NVIDIA B200")
L40S = FP8Environment((8, 9), "2.5.0", "NVIDIA L40S")
A100 = FP8Environment((8, 0), "2.5.0", "NVIDIA A100-SXM4-80GB")
RTX5090 = FP8Environment((12, 0), "2.5.0", "NVIDIA GeForce RTX 5090")
NO_CUDA = FP8Environment(None, None, "no CUDA device")
NO_TE = FP8Environment((9, 0), None, "NVIDIA H100 80GB HBM3")

SMALL = ["model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=384", "model.seq_length=64"]


def _config(*overrides: str):
    return load_config(None, ["precision=fp8", *SMALL, *overrides])


@pytest.mark.parametrize("recipe, env", [("delayed", H100), ("tensorwise", H100), ("blockwise", H100), ("mxfp8", B200)])
def test_transformer_config_for_each_recipe(recipe, env):
    extra = [] if recipe == "delayed" else ["fp8.first_last_layers_bf16=1"]
    config = _config(f"fp8.recipe={recipe}", "fp8.format=e4m3", *extra)
    tconfig = build_transformer_config(config, env)
    assert tconfig.fp8 == "e4m3"
    assert tconfig.fp8_recipe == Fp8Recipe(recipe)
    assert tconfig.bf16 and tconfig.params_dtype == torch.bfloat16  # bf16 weights, FP8 GEMMs
    assert resolve_precision(config, env) == "bf16" and resolve_spec(config, env) == "te"
    if recipe == "delayed":
        assert (tconfig.fp8_amax_history_len, tconfig.fp8_amax_compute_algo, tconfig.fp8_margin) == (1024, "max", 0)
        assert not tconfig.first_last_layers_bf16
    else:
        assert tconfig.first_last_layers_bf16
        assert (tconfig.num_layers_at_start_in_bf16, tconfig.num_layers_at_end_in_bf16) == (1, 1)
    assert not tconfig.fp8_param


@pytest.mark.parametrize("kernel", [True, False])
def test_gradient_accumulation_fusion_only_where_apex_kernel_exists(monkeypatch, kernel):
    """TE spec on a GPU turns the fusions on, but gradient-accumulation fusion only with apex's
    fused_weight_gradient_mlp_cuda (Megatron-Core's output layer raises without it; pip TE has no apex)."""
    from megatron_align.model import builder

    monkeypatch.setattr(builder.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builder, "have_grad_accum_fusion_kernel", lambda: kernel)
    monkeypatch.setattr(builder, "TransformerConfig", dict)  # its own checks want TE's fused RoPE, absent here
    kwargs = build_transformer_config(_config("fp8.recipe=delayed"), H100)
    assert kwargs["masked_softmax_fusion"] and kwargs["apply_rope_fusion"]  # the other fusions: on with the TE spec
    assert kwargs["gradient_accumulation_fusion"] is kernel


def test_delayed_scaling_settings_and_param_gather_mapping():
    config = _config(
        "fp8.amax_history_len=16", "fp8.amax_compute_algo=most_recent", "fp8.margin=2", "fp8.param_gather=true"
    )
    tconfig = build_transformer_config(config, L40S)
    assert (tconfig.fp8, tconfig.fp8_recipe) == ("hybrid", Fp8Recipe.delayed)
    assert (tconfig.fp8_amax_history_len, tconfig.fp8_amax_compute_algo, tconfig.fp8_margin) == (16, "most_recent", 2)
    assert tconfig.fp8_param
    assert fp8_ddp_kwargs(config) == {"fp8_param_gather": True}
    # bf16 runs carry no fp8 settings at all, whatever the fp8 section says
    bf16 = load_config(None, ["precision=fp32", "fp8.recipe=blockwise", "fp8.param_gather=true"])
    assert fp8_transformer_kwargs(bf16) == {} and fp8_ddp_kwargs(bf16) == {}
    assert build_transformer_config(bf16).fp8 is None


@pytest.mark.parametrize("overrides, fragment", [
    (["fp8.format=e5m2"], "fp8.format='e5m2'"),
    (["fp8.recipe=nvfp4"], "fp8.recipe='nvfp4'"),
    (["fp8.amax_compute_algo=mean"], "fp8.amax_compute_algo='mean'"),
    (["fp8.amax_history_len=0"], "fp8.amax_history_len=0"),
    (["fp8.margin=-1"], "fp8.margin=-1"),
    (["fp8.first_last_layers_bf16=-1", "fp8.recipe=tensorwise"], "fp8.first_last_layers_bf16=-1"),
    (["fp8.recipe=tensorwise", "fp8.amax_history_len=16"], "applies to fp8.recipe=delayed only"),
    (["fp8.recipe=mxfp8", "fp8.margin=1"], "fp8.margin=1 applies to fp8.recipe=delayed only"),
    (["fp8.first_last_layers_bf16=1"], "cannot be used with fp8.recipe=delayed"),
    (["precision=fp16"], "precision='fp16'"),
])
def test_bad_fp8_section_is_refused_at_load(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "overrides, env, error, fragment",
    [
        # config-only checks (named even on a machine without a GPU)
        (["model.spec=local"], H100, ConfigError, "model.spec=local has no FP8 path"),
        (["model.spec=portable"], H100, ConfigError, "model.spec=portable has no FP8 path"),
        (
            ["fp8.recipe=tensorwise", "fp8.first_last_layers_bf16=2", "parallel.pipeline=4"],
            H100,
            ConfigError,
            "exceeds the layers per pipeline stage",
        ),
        (["fp8.recipe=tensorwise", "fp8.first_last_layers_bf16=2"], H100, ConfigError, "keeps all 4 layers in BF16"),
        (
            ["fp8.param_gather=true", "optimizer.distributed='false'"],
            H100,
            ConfigError,
            "needs the distributed optimizer",
        ),
        (
            ["model.hidden_size=120", "model.ffn_hidden_size=384"],
            H100,
            ConfigError,
            "model.hidden_size = 120 is not a multiple of 16",
        ),
        (["model.ffn_hidden_size=392"], H100, ConfigError, "ffn_hidden_size / parallel.tensor = 392"),
        (
            ["model.num_attention_heads=16", "parallel.tensor=2"],
            H100,
            ConfigError,
            "key/value projection / parallel.tensor = 8 ",
        ),
        (["model.seq_length=60"], H100, ConfigError, "= 60 is not a multiple of 8"),
        # the machine
        ([], NO_CUDA, UserError, "needs a CUDA GPU with FP8 tensor cores"),
        ([], NO_TE, UserError, "'transformer_engine.pytorch', which is not importable"),
        ([], A100, UserError, "compute capability 8.0, without FP8 tensor cores"),
        (["fp8.recipe=mxfp8"], H100, UserError, "MXFP8 is a Blackwell data-center format"),
        (["fp8.recipe=mxfp8"], RTX5090, UserError, "does not support MXFP8 on cc 12.x"),
        (["fp8.recipe=blockwise"], L40S, UserError, "block scaling needs Hopper or newer"),
        (
            ["fp8.recipe=tensorwise"],
            FP8Environment((9, 0), "2.1.0", "H100"),
            UserError,
            "needs Transformer Engine >= 2.2.0",
        ),
        (
            ["fp8.recipe=blockwise"],
            FP8Environment((9, 0), "2.2.1", "H100"),
            UserError,
            "needs Transformer Engine >= 2.3.0",
        ),
        (
            ["fp8.recipe=mxfp8"],
            FP8Environment((10, 0), "2.0.0", "B200"),
            UserError,
            "needs Transformer Engine >= 2.1.0",
        ),
        ([], FP8Environment((9, 0), "1.13.0", "H100"), UserError, "fp8.recipe=delayed needs Transformer Engine >= 2.0"),
    ],
)
def test_every_refusal_names_the_problem(overrides, env, error, fragment):
    config = _config(*overrides)
    with pytest.raises(error) as err:
        validate_fp8(config, env)
    assert fragment in str(err.value)


def test_supported_combinations_pass():
    for overrides, env in [
        ([], L40S),
        (["fp8.recipe=tensorwise"], L40S),
        (["fp8.recipe=blockwise"], H100),
        (["fp8.recipe=blockwise"], FP8Environment((9, 0), "2.3.0.dev0+4a1b", "H100")),
        (["fp8.recipe=mxfp8"], B200),
        (["fp8.recipe=tensorwise", "fp8.first_last_layers_bf16=1"], H100),
        (["model.spec=te"], H100),
        (["parallel.tensor=2", "parallel.pipeline=2"], H100),
    ]:
        validate_fp8(_config(*overrides), env)
    assert supported_recipes("2.1.0") == ["delayed", "mxfp8"]
    assert supported_recipes("2.3.0") == ["delayed", "tensorwise", "blockwise", "mxfp8"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_fp8_run_without_gpu_fails_before_training(tmp_path, tiny_corpus):
    path = write_yaml(tmp_path / "fp8.yaml", tiny_config(tmp_path / "run", tiny_corpus, precision="fp8"))
    result = run_cli("train", path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "precision=fp8 needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


# ------------------------------------------------------------------------------------------- GPU
fp8_gpu_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and have_te() and torch.cuda.get_device_capability() >= (8, 9)),
    reason="needs a CUDA GPU with FP8 tensor cores (cc >= 8.9) and Transformer Engine")

_RESUME_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from megatron_align.config import load_config
    from megatron_align.model.fp8 import fp8_scaling_state
    from megatron_align.parallel.init import destroy_distributed, init_distributed
    from megatron_align.training.trainer import Trainer
    config = load_config(sys.argv[1])
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    states = []
    for attempt, port in enumerate((29811, 29812)):
        os.environ["MASTER_PORT"] = str(port)
        layout = init_distributed(config, 0, 1, 0)
        trainer = Trainer(config, layout)
        if attempt == 0:
            trainer.train()  # stops at train.stop_at_step and checkpoints there
        else:
            trainer.maybe_resume()
        states.append(fp8_scaling_state([m.module for m in trainer.model]))
        destroy_distributed()
    saved, restored = states
    out = {"modules": len(saved), "same_keys": sorted(saved) == sorted(restored),
           "equal": all(torch.equal(saved[k][t], restored[k][t]) for k in saved for t in saved[k]),
           "nonzero_amax": sum(int(bool(v["amax_history_fwd"].abs().sum() > 0)) for v in saved.values())}
    print(json.dumps(out))
""")


@pytest.mark.gpu
@fp8_gpu_only
def test_fp8_resume_restores_scaling_state(tmp_path, tiny_corpus):
    """Train 3 FP8 (delayed) steps, checkpoint, rebuild, resume: every TE module's amax history and scale match."""
    cfg = tiny_config(tmp_path / "fp8", tiny_corpus, precision="fp8", model={"spec": "te"},
                      train={"steps": 6, "stop_at_step": 3}, fp8={"recipe": "delayed", "amax_history_len": 8})
    path = write_yaml(tmp_path / "fp8.yaml", cfg)
    out = subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, path], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["modules"] >= 2 * cfg["model"]["num_layers"]  # qkv, proj, fc1, fc2 of every layer are TE modules
    assert result["same_keys"] and result["equal"]
    assert result["nonzero_amax"] > 0  # the history was populated by training, so equality is not trivial


@pytest.mark.gpu
@fp8_gpu_only
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_recipe_trains_on_this_gpu(tmp_path, tiny_corpus, recipe):
    """Each recipe this GPU + TE supports trains 4 steps with finite, decreasing loss; the others exit 2 naming it."""
    from megatron_align.training.metrics import read_metrics

    path = write_yaml(tmp_path / f"{recipe}.yaml", tiny_config(tmp_path / recipe, tiny_corpus, precision="fp8",
                                                                model={"spec": "te"}, fp8={"recipe": recipe}))
    try:
        validate_fp8(load_config(path))
        supported = True
    except UserError:
        supported = False
    result = run_cli("train", path)
    if not supported:
        assert result.returncode == 2 and f"fp8.recipe={recipe}" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [r["loss"] for r in read_metrics(os.path.join(tmp_path, recipe, "metrics.jsonl"))]
    assert len(losses) == 4 and all(x == x and x < 20 for x in losses) and losses[-1] < losses[0]
