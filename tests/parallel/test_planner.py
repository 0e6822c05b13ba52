"""Planner: parameter counts, the activation formulas, feasibility reasons, ranking, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from megatron_align.cli import main
from megatron_align.errors import ConfigError
from megatron_align.model.arithmetic import ModelShape
from megatron_align.parallel.planner import (
    GIB,
    Candidate,
    PlanOptions,
    count_parameters,
    enumerate_layouts,
    estimate_memory,
    evaluate_layout,
    get_gpu,
    layer_activation_bytes,
    load_plan_inputs,
    model_flops_per_step,
    plan,
)

LLAMA3_8B = ModelShape(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                       num_query_groups=8, vocab_size=128256, seq_length=8192, tie_embeddings=False)
LLAMA3_70B = ModelShape(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                        num_query_groups=8, vocab_size=128256, seq_length=8192, tie_embeddings=False)
H100 = get_gpu("h100-80gb")


def _hand_count(L, h, f, heads, groups, vocab, untied):
    head_dim = h // heads
    q, k, v, o = h * h, h * groups * head_dim, h * groups * head_dim, h * h
    gate, up, down = h * f, h * f, f * h
    norms = 2 * h
    return L * (q + k + v + o + gate + up + down + norms) + vocab * h * (2 if untied else 1) + h


def test_parameter_count_llama3_8b_and_70b():
    assert count_parameters(LLAMA3_8B) == _hand_count(32, 4096, 14336, 32, 8, 128256, True) == 8_030_261_248
    assert count_parameters(LLAMA3_70B) == _hand_count(80, 8192, 28672, 64, 8, 128256, True) == 70_553_706_496
    assert round(count_parameters(LLAMA3_8B) / 1e9, 2) == 8.03
    assert round(count_parameters(LLAMA3_70B) / 1e9, 1) == 70.6
    # Megatron pads the vocabulary to 128 x TP: 128256 is already a multiple of 128 but not of 1024.
    assert count_parameters(LLAMA3_8B, tp=8) == count_parameters(LLAMA3_8B) + (129024 - 128256) * 4096 * 2


_BUILD_GPT = textwrap.dedent("""
    import json, sys, warnings, torch
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(1, 1)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    counts = []
    for d in json.loads(sys.argv[2]):
        cfg = TransformerConfig(num_layers=d["num_layers"], hidden_size=d["hidden_size"],
            ffn_hidden_size=d["ffn_hidden_size"],
            num_attention_heads=d["num_attention_heads"], num_query_groups=d["num_query_groups"],
            kv_channels=d.get("kv_channels"), normalization="RMSNorm",
            gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
            use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
        model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=d["vocab_size"], max_sequence_length=d["seq_length"], position_embedding_type="rope",
            share_embeddings_and_output_weights=not d["untie_embeddings_and_output_weights"])
        counts.append(sum(p.numel() for p in model.parameters()))
    print(json.dumps(counts))
""")


def test_parameter_count_matches_a_real_megatron_gptmodel(tmp_path):
    """Exact count vs GPTModel built on CPU by Megatron-Core (in a subprocess: it initialises process groups)."""
    shapes = [
        dict(num_layers=2, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
             vocab_size=1000, seq_length=32, untie_embeddings_and_output_weights=True),
        dict(num_layers=3, hidden_size=96, ffn_hidden_size=256, num_attention_heads=6, num_query_groups=6,
             vocab_size=777, seq_length=16, untie_embeddings_and_output_weights=False),
        dict(num_layers=2, hidden_size=96, ffn_hidden_size=160, num_attention_heads=6, num_query_groups=2,
             kv_channels=32, vocab_size=301, seq_length=16, untie_embeddings_and_output_weights=True),  # q != h
    ]
    out = subprocess.run([sys.executable, "-c", _BUILD_GPT, str(tmp_path / "pg"), json.dumps(shapes)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    expected = [
        count_parameters(
            ModelShape(
                **{k: v for k, v in s.items() if k != "untie_embeddings_and_output_weights"},
                tie_embeddings=not s["untie_embeddings_and_output_weights"],
                make_vocab_size_divisible_by=1,
            )
        )
        for s in shapes
    ]
    assert measured == expected


_MEASURE_WITH_BUILDER = textwrap.dedent("""
    import json, sys, warnings, torch
    warnings.filterwarnings("ignore")
    import os
    from megatron_align.config import load_config
    from megatron_align.model.builder import build_model_chunks
    from megatron_align.parallel.init import init_distributed
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    dims = json.loads(sys.argv[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + os.getpid() % 200))
    vocab = dims.pop("vocab_size")
    config = load_config(None, ["data.mock=true", "precision=fp32"] + [f"model.{k}={v}" for k, v in dims.items()])
    init_distributed(config, 0, 1, 0)
    chunks = build_model_chunks(config, vocab)
    ddp = [DistributedDataParallel(c.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), c)
           for c in chunks]
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.0), ddp)
    for c in chunks:
        for p in c.parameters():
            p.main_grad.fill_(0.01)
    optimizer.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    state = [v for o in inner for s in o.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    masters = [p for o in getattr(optimizer, "chained_optimizers", [optimizer])
               for g in getattr(o, "fp32_from_float16_groups", []) for p in g]
    print(json.dumps({"params": nbytes([p for c in chunks for p in c.parameters()]),
                      "grads": sum(nbytes([b.grad_data]) for d in ddp for b in d.buffers),
                      "optimizer": nbytes(state) + nbytes(masters)}))
""")


def test_planner_weight_and_optimizer_memory_within_10_percent_of_megatron_on_cpu():
    """Issue 5: planner's parameter + optimizer memory vs what Megatron-Core allocates on CPU (tiny model, fp32).

    The model is built exactly as the trainer builds it (init_distributed + build_model_chunks, one CPU rank,
    fp32). DDP wraps it with fp32 grad buffers; Adam steps once so its states exist. Runs in a subprocess
    because CPU routing is process-wide.
    """
    dims = dict(num_layers=2, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
                vocab_size=512, seq_length=32)
    out = subprocess.run([sys.executable, "-c", _MEASURE_WITH_BUILDER, json.dumps(dims)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    model = ModelShape(**dims, tie_embeddings=False)
    memory = estimate_memory(model, Candidate(1, 1, 1, 1, 1, 1, "none", False), PlanOptions(precision="fp32"), 1)
    planned = memory.params + memory.grads + memory.optimizer
    assert abs(planned - sum(measured.values())) <= 0.10 * sum(measured.values()), (planned, measured)


def test_activation_formula_reproduces_korthikanti_for_gpt3():
    """GELU 4h MLP, MHA, dropout, unfused softmax: s*b*h*(34 + 5as/h); with TP t and no SP: 10 + 24/t + 5as/(ht)."""
    gpt = ModelShape(
        num_layers=4,
        hidden_size=1024,
        ffn_hidden_size=4096,
        num_attention_heads=16,
        num_query_groups=16,
        vocab_size=51200,
        seq_length=2048,
        gated_linear_unit=False,
        hidden_dropout=0.1,
        attention_dropout=0.1,
    )
    s, b, h, a = 2048, 2, 1024, 16
    unfused = PlanOptions(flash_attention=False)
    kept, _ = layer_activation_bytes(gpt, Candidate(1, 1, 1, 1, 1, b, "none"), unfused)
    assert kept == pytest.approx(s * b * h * (34 + 5 * a * s / h))
    kept, _ = layer_activation_bytes(
        gpt, Candidate(4, 1, 1, 1, 1, b, "none"), PlanOptions(flash_attention=False, sequence_parallel=False)
    )
    assert kept == pytest.approx(s * b * h * (10 + 24 / 4 + 5 * a * s / (h * 4)))
    kept, _ = layer_activation_bytes(gpt, Candidate(4, 1, 1, 1, 1, b, "selective"), unfused)  # SP + selective: 34/t
    assert kept == pytest.approx(s * b * h * 34 / 4)
    kept, full = layer_activation_bytes(gpt, Candidate(4, 1, 1, 1, 1, b, "full"), unfused)
    assert kept == pytest.approx(2 * s * b * h / 4) and full > 10 * kept


def test_llama_activation_coefficient_and_context_parallel():
    s, b, h = 8192, 1, 4096
    kept, _ = layer_activation_bytes(LLAMA3_8B, Candidate(1, 1, 1, 1, 1, b), PlanOptions())
    # 12 + 4*g/a + 6*f/h = 34 for the 8B shape, plus the fp32 log-sum-exp of flash attention (4a/h).
    assert kept == pytest.approx(s * b * h * (12 + 4 * 8 / 32 + 6 * 14336 / 4096 + 4 * 32 / 4096))
    halved, _ = layer_activation_bytes(LLAMA3_8B, Candidate(1, 1, 1, 2, 1, b), PlanOptions())
    assert halved == pytest.approx(kept / 2)


def test_optimizer_bytes_with_and_without_distributed_optimizer():
    tiny = ModelShape(num_layers=2, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
                     vocab_size=512, seq_length=32)
    params = count_parameters(tiny)
    plain = estimate_memory(tiny, Candidate(1, 1, 1, 1, 8, 1, "none", False), PlanOptions(), 1)
    sharded = estimate_memory(tiny, Candidate(1, 1, 1, 1, 8, 1, "none", True), PlanOptions(), 1)
    assert (plain.params, plain.grads, plain.optimizer) == (2 * params, 4 * params, 12 * params)
    assert sharded.params + sharded.grads + sharded.optimizer == pytest.approx((6 + 12 / 8) * params)
    fp8 = estimate_memory(tiny, Candidate(1, 1, 1, 1, 8, 1, "none", True), PlanOptions(precision="fp8"), 1)
    linear = 2 * tiny.linear_params_per_layer()
    assert fp8.fp8 == pytest.approx(2 * linear + 2 * 4 * 3 * (1024 + 2) * 4)  # FP8 copy + transpose, scaling state


def test_pipeline_first_stage_holds_pp_microbatches_and_interleaving_costs_more():
    opts = PlanOptions(overhead_gib=0)
    kept, _ = layer_activation_bytes(LLAMA3_70B, Candidate(4, 8, 1, 1, 2, 1), opts)
    first = estimate_memory(LLAMA3_70B, Candidate(4, 8, 1, 1, 2, 1), opts, num_microbatches=32)
    if first.stage == "first":
        assert first.activations == pytest.approx(80 * kept)  # 8 micro batches x 10 layers
    interleaved = estimate_memory(LLAMA3_70B, Candidate(4, 8, 2, 1, 2, 1), opts, num_microbatches=32)
    assert interleaved.activations > first.activations
    few = estimate_memory(LLAMA3_70B, Candidate(4, 8, 1, 1, 2, 1), opts, num_microbatches=2)
    assert few.activations < first.activations  # only 2 micro batches can be in flight


def test_flops_match_megatron_closed_form():
    m, T = LLAMA3_70B, 1024 * 8192
    L, h, f, a, g, s, V = 80, 8192, 28672, 64, 8, 8192, 128256
    # Megatron-LM's num_floating_point_operations with its causal factor: attention s/h halved (s / 2h).
    closed = 12 * T * L * h * h * ((1 + g / a + s / (2 * h)) + 1.5 * f / h) + 6 * T * h * V
    assert model_flops_per_step(m, T) == pytest.approx(closed, rel=1e-12)
    assert model_flops_per_step(m, T) > 6 * count_parameters(m) * T  # attention adds to 6NT


def test_infeasibility_reasons_are_named():
    opts = PlanOptions()
    tp3 = evaluate_layout(LLAMA3_8B, Candidate(3, 1, 1, 1, 1, 1), H100, opts, 24)
    assert any("num_attention_heads 32 % tp 3" in r for r in tp3.reasons)
    assert any("num_query_groups 8 % tp 3" in r for r in tp3.reasons)
    tp16 = evaluate_layout(LLAMA3_8B, Candidate(16, 1, 1, 1, 1, 1), H100, opts, 16)
    assert any("spans more than one node of 8 GPUs" in r for r in tp16.reasons)
    assert any("num_query_groups 8 % tp 16" in r for r in tp16.reasons)
    layers = evaluate_layout(LLAMA3_8B, Candidate(1, 3, 1, 1, 1, 1), H100, opts, 12)
    assert any("num_layers 32 % (pp*vpp = 3)" in r for r in layers.reasons)
    batch = evaluate_layout(LLAMA3_8B, Candidate(8, 1, 1, 1, 3, 2), H100, opts, 16)
    assert any("global_batch_size 16 % (micro_batch 2 * dp 3 = 6)" in r for r in batch.reasons)
    fp8 = evaluate_layout(LLAMA3_8B, Candidate(8, 1, 1, 1, 1, 1), get_gpu("a100-80gb"), PlanOptions(precision="fp8"), 8)
    assert any("fp8 needs FP8 tensor cores" in r for r in fp8.reasons)
    nofit = evaluate_layout(LLAMA3_70B, Candidate(8, 1, 1, 1, 1, 1, "full", False), H100, opts, 8)
    assert any(r.startswith("OOM:") for r in nofit.reasons) and nofit.memory.total > 80 * GIB


def test_70b_does_not_fit_8_gpus_but_fits_64():
    on_8 = plan(LLAMA3_70B, 8, H100, 64)
    assert on_8 and not any(r.feasible for r in on_8)
    assert all(any(reason.startswith("OOM") for reason in r.reasons) for r in on_8)
    on_64 = plan(LLAMA3_70B, 64, H100, 512)
    best = on_64[0]
    assert best.feasible and best.memory.total <= H100.memory_gib * GIB
    assert best.layout.tp * best.layout.pp * best.layout.cp >= 8  # 70B needs model parallelism
    assert best.layout.world_size == 64


def test_ranking_sanity_and_mfu_bounded():
    for precision in ("bf16", "fp8"):
        opts = PlanOptions(precision=precision)
        results = plan(LLAMA3_8B, 16, H100, 128, opts)
        feasible = [r for r in results if r.feasible]
        assert feasible and not results[-1].feasible  # feasible ones come first
        times = [r.step_time_s for r in feasible]
        assert times == sorted(times)
        for r in results:
            assert 0 < r.mfu <= max(opts.compute_efficiency, opts.fp8_compute_efficiency) <= 1
    # More GPUs for the same global batch: shorter steps.
    assert plan(LLAMA3_8B, 32, H100, 128)[0].step_time_s < plan(LLAMA3_8B, 16, H100, 128)[0].step_time_s
    # Recompute trades time for memory on the same layout.
    none, full = (
        evaluate_layout(LLAMA3_8B, Candidate(2, 1, 1, 1, 8, 1, rc), H100, PlanOptions(), 128) for rc in ("none", "full")
    )
    assert full.step_time_s > none.step_time_s and full.memory.activations < none.memory.activations


def test_plan_inputs_from_yaml_and_missing_key(tmp_path):
    cfg = tmp_path / "llama.yaml"
    cfg.write_text("precision: fp8\nmodel:\n  num_layers: 32\n  hidden_size: 4096\n  ffn_hidden_size: 14336\n"
                   "  num_attention_heads: 32\n  num_query_groups: 8\n  vocab_size: 128256\n  seq_length: 8192\n"
                   "  tie_embeddings: false\ntrain:\n  global_batch_size: 512\n")
    inputs = load_plan_inputs(str(cfg))
    assert inputs.model == LLAMA3_8B and inputs.global_batch_size == 512 and inputs.precision == "fp8"
    dotted = load_plan_inputs(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                                     "model.vocab_size=100", "model.seq_length=16", "model.tie_embeddings=true",
                                     "train.global_batch_size=4"])
    assert dotted.model.ffn_hidden_size == 192 and dotted.model.num_query_groups == 4
    assert dotted.model.tie_embeddings
    (tmp_path / "bad.yaml").write_text("model:\n  num_layers: 2\ntrain:\n  global_batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.hidden_size is required"):
        load_plan_inputs(str(tmp_path / "bad.yaml"))


def test_cli_plan_end_to_end(tmp_path, capsys):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("model:\n  num_layers: 16\n  hidden_size: 2048\n  ffn_hidden_size: 5632\n  num_attention_heads: 16\n"
                   "  num_query_groups: 4\n  vocab_size: 32000\n  seq_length: 4096\ntrain:\n  global_batch_size: 64\n")
    out = tmp_path / "plan.json"
    assert main(["plan", str(cfg), "--gpus", "8", "--gpu", "h100-sxm", "--top", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TP" in text and "MFU" in text and text.count(" ok") == 3
    data = json.loads(out.read_text())
    assert data["gpu"] == "h100-80gb" and data["results"][0]["feasible"]
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    assert main(["plan", str(tmp_path / "missing.yaml"), "--gpus", "8"]) == 2
    assert main(["plan", str(cfg), "--gpus", "8", "--gpu", "tpu-v9"]) == 2


def test_vpp_candidates_are_every_divisor_of_the_layers_per_stage():
    vpps = {c.vpp for c in enumerate_layouts(64, LLAMA3_70B) if (c.tp, c.pp) == (4, 8)}
    assert vpps == {1, 2, 5, 10}  # 80 layers / PP8 = 10 per stage; {1,2,4,8} would miss Megatron-Bridge's VP5
    assert {c.vpp for c in enumerate_layouts(64, LLAMA3_70B) if c.pp == 1} == {1}


def test_megatron_bridge_70b_fp8_layout_fits_an_h100():
    """Megatron-Bridge runs Llama-3-70B FP8 at TP4 PP8 VP5, MBS 1, GBS 128 on 64 H100-80GB (no recompute)."""
    opts = PlanOptions(precision="fp8")
    bridge = evaluate_layout(LLAMA3_70B, Candidate(4, 8, 5, 1, 2, 1), H100, opts, 128)
    assert bridge.feasible, bridge.reasons
    assert 60 * GIB < bridge.memory.total <= H100.memory_gib * GIB  # it runs, and not with room to spare
    assert any(r.layout == bridge.layout and r.feasible for r in plan(LLAMA3_70B, 64, H100, 128, opts))
    # Interleaving with fewer, bigger chunks holds more activations: VP2 warms up 23 chunks of 5 layers.
    vp2 = evaluate_layout(LLAMA3_70B, Candidate(4, 8, 2, 1, 2, 1), H100, opts, 128)
    assert vp2.memory.activations > bridge.memory.activations


def test_fp8_activations_keep_fp8_gemm_inputs():
    s, b, h, t = 8192, 1, 8192, 4
    r_q, r_kv, r_f, a = 1.0, 1024 / 8192, 28672 / 8192, 64
    bf16, _ = layer_activation_bytes(LLAMA3_70B, Candidate(t, 8, 1, 1, 2, b), PlanOptions())
    fp8, _ = layer_activation_bytes(LLAMA3_70B, Candidate(t, 8, 1, 1, 2, b), PlanOptions(precision="fp8"))
    assert bf16 == pytest.approx(s * b * h * (8 + 4 * r_q + 4 * r_kv + 6 * r_f + 4 * a / h) / t)
    # QKV/fc1/fc2 inputs in FP8 (1 byte), the proj input's FP8 cast beside the bf16 attention output.
    assert fp8 == pytest.approx(s * b * h * (6 + 5 * r_q + 4 * r_kv + 5 * r_f + 4 * a / h) / t)


def test_grad_buffer_bytes_follow_the_reduction_dtype():
    params = count_parameters(LLAMA3_8B)
    fp32 = estimate_memory(LLAMA3_8B, Candidate(1, 1, 1, 1, 8, 1), PlanOptions(), 1)
    bf16 = estimate_memory(LLAMA3_8B, Candidate(1, 1, 1, 1, 8, 1), PlanOptions(grad_reduce_in_fp32=False), 1)
    assert (fp32.grads, bf16.grads) == (4 * params, 2 * params)


def test_cli_plan_takes_overrides_like_train(tmp_path, capsys):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("model:\n  num_layers: 16\n  hidden_size: 2048\n  num_attention_heads: 16\n  num_query_groups: 4\n"
                   "  vocab_size: 32000\n  seq_length: 4096\nparallel:\n  tensor: 2\ntrain:\n  global_batch_size: 64\n")
    assert (
        main(["plan", str(cfg), "train.global_batch_size=32", "parallel.pipeline=2", "--gpus", "8", "--top", "1"]) == 0
    )
    text = capsys.readouterr().out
    assert "global batch 32" in text
    assert "the config's own layout (TP2 PP2 VPP1 CP1 DP2, micro batch 1, recompute none): rank" in text
    assert main(["plan", str(cfg), "model.hiden_size=4096", "--gpus", "8"]) == 2
    assert "model.hiden_size" in capsys.readouterr().err
    assert main(["plan", "goodput", "train.steps=3", "--gpus", "8", "--save-s", "1", "--restore-s", "1",
                 "--restart-s", "1"]) == 2
