"""The portable spec (SDPA core attention): same keys as local, same numbers, checkpoints move between them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_MODEL, run_cli, tiny_config, write_yaml

from megatron_align.config import load_config
from megatron_align.errors import ConfigError
from megatron_align.model.builder import build_transformer_config
from megatron_align.model.portable import sdpa_attention
from megatron_align.training.metrics import read_metrics


def _reference_attention(q, k, v, drop_mask, scale):
    """Plain softmax attention on Megatron layouts; kv heads repeated as Megatron's DotProductAttention does."""
    repeats = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    scores = scores.masked_fill(drop_mask, float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(q.size(0), q.size(1), -1)


@pytest.mark.parametrize("native_gqa", [False, True])
def test_sdpa_matches_reference_attention_with_gqa_causal_and_masks(native_gqa):
    gen = torch.Generator().manual_seed(0)
    sq, b, hq, hkv, d = 12, 2, 8, 2, 16
    q = torch.randn(sq, b, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(sq, b, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(sq, b, hkv, d, generator=gen, dtype=torch.float64)
    causal_drop = torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)
    expected = _reference_attention(q, k, v, causal_drop, 0.25)
    got = sdpa_attention(q, k, v, causal=True, keep_mask=None, scale=0.25, dropout_p=0.0, native_gqa=native_gqa)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # an explicit mask (Megatron: True = drop) that also hides the first key from the second batch row
    drop = causal_drop.expand(b, 1, sq, sq).clone()
    drop[1, :, 1:, 0] = True
    got = sdpa_attention(q, k, v, causal=False, keep_mask=~drop, scale=0.25, dropout_p=0.0, native_gqa=native_gqa)
    torch.testing.assert_close(got, _reference_attention(q, k, v, drop, 0.25), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, expected)  # the extra masked key changed the result


def test_portable_spec_config_checks():
    config = load_config(None, ["model.spec=portable", "precision=fp32"])
    assert build_transformer_config(config).fp8 is None
    with pytest.raises(ConfigError, match="parallel.context > 1 needs model.spec=te"):
        build_transformer_config(load_config(None, ["model.spec=portable", "precision=fp32", "parallel.context=2"]))


_COMPARE_SPECS = textwrap.dedent("""
    import json, os, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron_align.config import load_config
    from megatron_align.model.builder import build_model_chunks
    from megatron_align.model.portable import PortableDotProductAttention
    from megatron_align.parallel.init import init_distributed
    dims = json.loads(sys.argv[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + os.getpid() % 200))
    base = ["data.mock=true", "precision=fp32"] + [f"model.{k}={v}" for k, v in dims.items()]
    init_distributed(load_config(None, base + ["model.spec=local"]), 0, 1, 0)
    models = {spec: build_model_chunks(load_config(None, base + [f"model.spec={spec}"]), 512)[0]
              for spec in ("local", "portable")}
    def sharded(model):
        return {k: (v.key, tuple(v.global_shape) if isinstance(v, ShardedTensor) else type(v).__name__)
                for k, v in model.sharded_state_dict().items()}
    local, portable = models["local"], models["portable"]
    portable.load_state_dict(local.state_dict())  # strict: every key must match
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, dims["seq_length"]), generator=gen)
    position_ids = torch.arange(dims["seq_length"]).expand(2, -1)
    losses = {name: m(tokens, position_ids, None, labels=tokens.roll(-1, 1)).double() for name, m in models.items()}
    for name, loss in losses.items():
        loss.mean().backward()
    grads = max((a.grad - b.grad).abs().max().item() for a, b in zip(local.parameters(), portable.parameters()))
    print(json.dumps({
        "state_keys_equal": list(local.state_dict()) == list(portable.state_dict()),
        "num_state_keys": len(local.state_dict()),
        "sharded_equal": sharded(local) == sharded(portable),
        "param_shapes_equal": [(n, tuple(p.shape)) for n, p in local.named_parameters()]
                              == [(n, tuple(p.shape)) for n, p in portable.named_parameters()],
        "portable_attention": sum(isinstance(m, PortableDotProductAttention) for m in portable.modules()),
        "local_attention": sum(isinstance(m, PortableDotProductAttention) for m in local.modules()),
        "max_loss_diff": (losses["local"] - losses["portable"]).abs().max().item(),
        "max_grad_diff": grads,
    }))
""")


def test_portable_and_local_have_identical_keys_and_outputs():
    """Built as the trainer builds them (1 CPU rank, fp32): same state-dict / sharded keys; same loss and grads."""
    dims = {k: v for k, v in TINY_MODEL.items() if k != "tie_embeddings"}
    out = subprocess.run(
        [sys.executable, "-c", _COMPARE_SPECS, json.dumps(dims)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state_keys_equal"] and result["sharded_equal"] and result["param_shapes_equal"], result
    assert result["num_state_keys"] > 10
    assert result["portable_attention"] == TINY_MODEL["num_layers"] and result["local_attention"] == 0
    assert result["max_loss_diff"] < 1e-5 and result["max_grad_diff"] < 1e-5, result


@pytest.mark.slow
def test_local_checkpoint_trains_on_in_portable_with_the_same_losses(tmp_path, tiny_corpus):
    """Real `megatron-align train` runs, 1 rank, fp32: local spec for 4 steps (checkpoint at 2); then the portable
    spec loads that local checkpoint (optimizer and data position included) and runs steps 3-4 on the same
    batches. Same losses and grad norms to 1e-5: same keys, same weights, same arithmetic."""
    local_cfg = write_yaml(
        tmp_path / "local.yaml", tiny_config(tmp_path / "local", tiny_corpus, model={"spec": "local"})
    )
    result = run_cli("train", local_cfg)
    assert result.returncode == 0, result.stderr[-4000:]
    portable_cfg = write_yaml(
        tmp_path / "portable.yaml", tiny_config(tmp_path / "portable", tiny_corpus, model={"spec": "portable"})
    )
    result = run_cli("train", portable_cfg, f"checkpoint.load={tmp_path / 'local' / 'checkpoints' / 'iter_0000002'}")
    assert result.returncode == 0, result.stderr[-4000:]
    local = {r["step"]: r for r in read_metrics(tmp_path / "local" / "metrics.jsonl")}
    portable = {r["step"]: r for r in read_metrics(tmp_path / "portable" / "metrics.jsonl")}
    assert sorted(local) == [1, 2, 3, 4] and sorted(portable) == [3, 4]
    for step in (3, 4):
        assert portable[step]["loss"] == pytest.approx(local[step]["loss"], rel=1e-5, abs=1e-5), step
        assert portable[step]["grad_norm"] == pytest.approx(local[step]["grad_norm"], rel=1e-5), step
        assert portable[step]["consumed_samples"] == local[step]["consumed_samples"]
    assert local[4]["loss"] < local[1]["loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_portable_matches_local_in_bf16_on_gpu(tmp_path, tiny_corpus):
    """On a GPU SDPA picks flash / memory-efficient kernels; bf16 losses agree with the local spec to bf16 precision."""
    losses = {}
    for spec in ("local", "portable"):
        path = write_yaml(tmp_path / f"{spec}.yaml", tiny_config(tmp_path / spec, tiny_corpus, precision="bf16",
                                                                  model={"spec": spec}))
        result = run_cli("train", path)
        assert result.returncode == 0, result.stderr[-4000:]
        losses[spec] = [r["loss"] for r in read_metrics(tmp_path / spec / "metrics.jsonl")]
    assert losses["local"] == pytest.approx(losses["portable"], rel=2e-2)
