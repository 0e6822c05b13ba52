"""The planner against Megatron-Bridge's published H100 table: FLOPs per token, memory, tokens/s/GPU.

Source: NVIDIA-NeMo/Megatron-Bridge ``docs/performance-summary.md``, section "25.11 NeMo Container",
"System: DGX-H100", FP8 current scaling (FP8-CS), sequence length 8192 (recipes:
``scripts/performance/configs/llama/llama3_workload_base_configs.py``; they set
``grad_reduce_in_fp32=False`` and TE's userbuffer TP overlap). For each row this prints the
published numbers, our FLOPs per token, the planner's estimate *for the published layout*
(once with this trainer's fp32 gradient buffers, once with Bridge's bf16 ones) and the layout the
planner ranks first. Pure arithmetic, no GPU:

    python benchmarks/planner_vs_published.py
"""

from __future__ import annotations

from megatron_align.model.arithmetic import GIB, ModelShape, get_gpu
from megatron_align.parallel.planner import Candidate, PlanOptions, evaluate_layout, plan

SHAPES = {
    "Llama-3-8B": ModelShape(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                             num_query_groups=8, vocab_size=128256, seq_length=8192),
    "Llama-3-70B": ModelShape(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                              num_query_groups=8, vocab_size=128256, seq_length=8192),
    "Llama-3.1-405B": ModelShape(num_layers=126, hidden_size=16384, ffn_hidden_size=53248, num_attention_heads=128,
                                 num_query_groups=8, vocab_size=128256, seq_length=8192),
}
# name, GPUs, GBS, (TP, PP, VP, CP, MBS), tokens/s/GPU, model TFLOP/s/GPU, what the row uses that we do not model
PUBLISHED = [
    ("Llama-3-8B", 8, 128, (1, 1, 1, 1, 1), 14451, 744, "Megatron FSDP + 5 recomputed layers"),
    ("Llama-3-70B", 64, 128, (4, 8, 5, 1, 1), 1602, 719, "TP comm overlap"),
    ("Llama-3.1-405B", 1024, 512, (8, 8, 8, 2, 1), 292, 737, "uneven pipeline (126 layers on 64 chunks)"),
]


def main() -> None:
    h100 = get_gpu("h100-80gb")
    print("| model | GPUs | published layout | published tok/s/GPU (TFLOP/s) | FLOPs/token published / ours "
          "| planner, published layout: GiB fp32 grads / bf16 grads, tok/s/GPU | planner's first layout, tok/s/GPU |")
    print("|---|---|---|---|---|---|---|")
    for name, gpus, gbs, (tp, pp, vp, cp, mbs), tokens, tflops, unmodelled in PUBLISHED:
        shape = SHAPES[name]
        dp = gpus // (tp * pp * cp)
        layout = Candidate(tp, pp, vp, cp, dp, mbs)
        ours = evaluate_layout(shape, layout, h100, PlanOptions(precision="fp8"), gbs)
        bridge = evaluate_layout(shape, layout, h100, PlanOptions(precision="fp8", grad_reduce_in_fp32=False), gbs)
        best = next((r for r in plan(shape, gpus, h100, gbs, PlanOptions(precision="fp8")) if r.feasible), None)
        best_text = (f"{best.layout.label} mbs{best.layout.micro_batch_size} {best.layout.recompute}, "
                     f"{best.tokens_per_s_per_gpu:,.0f}" if best else "none feasible")
        flags = "; ".join(r for r in ours.reasons if not r.startswith("OOM")) or "ok"
        print(f"| {name} | {gpus} | TP{tp} PP{pp} VP{vp} CP{cp} DP{dp} MBS{mbs} GBS{gbs} ({unmodelled}) "
              f"| {tokens:,} ({tflops}) | {tflops * 1e12 / tokens:.4g} / {shape.flops_per_token(tp):.4g} "
              f"| {ours.memory.total / GIB:.1f} / {bridge.memory.total / GIB:.1f} of {h100.memory_gib}, "
              f"{ours.tokens_per_s_per_gpu:,.0f} ({ours.tokens_per_s_per_gpu / tokens - 1:+.0%}; {flags}) "
              f"| {best_text} |")


if __name__ == "__main__":
    main()
