"""Plan a TP x PP x VPP x CP x DP layout before submitting a job: memory per GPU, step time, MFU.

What: for every candidate layout (tensor TP, pipeline PP, virtual pipeline VPP, context CP,
data DP, micro batch b, recompute, distributed optimizer) estimate the peak memory of the
worst GPU and the time of one optimizer step, reject what cannot run (with the reason) and
rank the rest by step time. Pure arithmetic: nothing here touches torch or a GPU.

Why: a 70B job that OOMs after 20 minutes in the queue, or runs at half the MFU of its
neighbour layout, costs more than reading this table. The one idea: memory and time of a
Llama-style transformer are a handful of closed-form terms in (s, b, h, f, a, g, L, V), and
every parallel dimension divides exactly one of them.

Notation: L layers, h hidden, f ffn hidden, a query heads, g query groups (KV heads),
d = h/a head dim, q = a*d, kv = g*d, V padded vocab (a multiple of 128*TP, as Megatron
pads it), s sequence, b micro batch, t = TP, c = CP, T tokens per step.

The model's shape, parameter count, FLOPs per token and the GPU peaks are not defined here:
they come from :mod:`megatron_align.model.arithmetic`, which the trainer's measured MFU uses too.

Parameters per GPU: layers L/PP, linear weights / TP (norms replicated), embedding on the first
                stage, output layer on the last (a tied embedding is copied there when PP > 1).

Weights, gradients, optimizer (bytes per parameter, Megatron mixed precision, Adam):
    bf16/fp8: 2 (bf16 weight) + 4 (fp32 main grad; 2 when grad_reduce_in_fp32=False, as
              Megatron-Bridge's recipes run) + 12 (fp32 master + m + v)            = 18
    with the distributed optimizer the 12 are sharded over DP*CP: 6 + 12/(DP*CP)
    fp32 (CPU runs): 4 + 4 + 8 (no master copy).
    FP8 (Transformer Engine): + 2 bytes per linear weight (FP8 copy + its transpose, cached
    across micro batches) + per GEMM 3 scaling tensors x (amax history + 2) fp32.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models"). For GPT-3 (MHA, GELU 4h MLP, dropout, unfused softmax) a layer keeps
    s*b*h*(34 + 5*a*s/h) bytes,
    34 = 11 attention (QKV input 2, Q 2, K 2, V 2, proj input 2, dropout mask 1)
       + 19 MLP (fc1 input 2, GELU input 8, fc2 input 8, dropout mask 1) + 4 two LayerNorm inputs,
    5*a*s/h = softmax output 2 + dropout mask 1 + dropout output 2, per (query, key) pair.
Derived here for Llama (bytes per s*b*h, with r_q = q/h, r_kv = kv/h, r_f = f/h):
    norms 4 (two RMSNorm inputs; their fp32 rstd is O(s*b), dropped)
    attention 2 (QKV input) + 2*r_q (Q) + 4*r_kv (K and V: GQA shrinks them by g/a)
              + 2*r_q (core-attention output = proj input)
    MLP 2 (fc1 input) + 4*r_f (gate and up, the SwiGLU input) + 2*r_f (SwiGLU output = fc2 input)
    dropout masks 1 each for attention-out and MLP-out when hidden_dropout > 0 (Llama: 0)
    core attention: fused/flash kernels keep only a fp32 log-sum-exp (4*a/h); unfused keeps
              the softmax 2*a*s/h (+3*a*s/h with attention dropout, giving Korthikanti's 5).
    => Llama-3-8B: 12 + 4*g/a + 6*f/h = 12 + 1 + 21 = 34 (by coincidence the GPT-3 constant).
    FP8 (TE, current or delayed scaling): each FP8 GEMM saves the FP8 cast of its input, not the
              bf16 tensor: QKV and fc1 inputs 1 each, fc2 input 1*r_f, and linear_proj keeps a 1*r_q
              FP8 cast beside the bf16 attention output that flash attention keeps for its backward:
              6 + 5*r_q + 4*r_kv + 5*r_f (Llama-3-70B: 29 instead of 33.5). The BF16 first and last
              layers (fp8.first_last_layers_bf16) are counted as FP8; the difference is 2 layers.
Sequence parallel divides every term by TP (without it, the norm inputs, QKV/fc1 inputs and
dropout masks -- 8 of them for Llama -- stay replicated). CP divides s. Selective recompute
(core attention) drops the a*s/h term; full recompute keeps only each layer's input (2*s*b*h
/TP) plus one layer's activations while it is recomputed.
Pipeline: with 1F1B, stage r holds min(m, PP - r) micro batches in flight, i.e. the first
stage holds PP * (L/PP) = L layers' worth, independent of PP. Interleaved (VPP chunks of
L/(PP*VPP) layers): rank r warms up 2*(PP-r-1) + (VPP-1)*PP chunks, so rank 0 holds
L*(1 + (PP-1)/(PP*VPP)) layers' worth. The last stage also holds the logits: s*b*V/TP x
(2 bf16 + 4 fp32 for the cross entropy). Plus a fixed overhead (CUDA context, NCCL and
cuBLAS workspaces, allocator fragmentation): PlanOptions.overhead_gib.

FLOPs: model FLOPs/step = T x ModelShape.flops_per_token = T x (6*N_lin + 6*h*V + 6*L*s*q),
causal attention counted once (what Megatron-Bridge publishes; within 0.1% of its H100 table).
Compute time uses the same causal attention FLOPs (flash attention skips the masked blocks);
recompute adds hardware FLOPs (full: one more forward; selective: the core-attention forward)
but not model FLOPs. Compute time = FLOPs / (peak x efficiency); FP8 runs the linear layers at
the FP8 peak, attention and the output layer at the BF16 peak; fp32 runs at the FP32 peak.

Communication (ring collectives move 2*(n-1)/n of the buffer per GPU for an all-reduce,
(n-1)/n for a reduce-scatter or all-gather; bandwidth NVLink inside a node, the per-GPU NIC
across nodes, both times PlanOptions.comm_efficiency):
    TP (SP): 4 all-reduce equivalents of s*b*h*2 bytes per layer per micro batch (2 forward,
         2 backward; +2 with full recompute), not overlapped (the trainer does not enable TE's
         userbuffer TP overlap; Megatron-Bridge's recipes do, which is most of the gap in
         docs/benchmarks.md).
    CP (ring attention): 3*(CP-1) exchanges of a K,V chunk per layer per micro batch,
         hidden behind core-attention compute where it fits.
    PP: send activations forward and gradients back at every chunk boundary, and the bubble:
         step = t_microbatch * (m + (PP-1)/VPP), i.e. a bubble fraction (PP-1)/(VPP*m).
    DP: gradients (fp32) all-reduced, or reduce-scattered + bf16 weights all-gathered with the
         distributed optimizer, over DP*CP ranks; overlapped with the last micro batch's backward
         (and the first one's forward for the all-gather); only the excess is exposed.
Candidates: TP up to a node, PP dividing the rest, VPP every divisor of the layers per stage
(80 layers on PP8: 1, 2, 5, 10), CP in 1/2/4/8. Ranking by estimated step time;
MFU = model FLOPs / (step time x GPUs x dense peak of the
training precision), so it is at most the efficiency factor.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from megatron_align.errors import ConfigError, UserError
from megatron_align.model.arithmetic import (  # noqa: F401 (re-exported)
    GIB,
    GPU_ALIASES,
    GPUS,
    PRECISIONS,
    GpuSpec,
    ModelShape,
    count_parameters,
    get_gpu,
)

if TYPE_CHECKING:
    from megatron_align.config import RootConfig

RECOMPUTE_CHOICES = ("none", "selective", "full")


@dataclass
class PlanInputs:
    model: ModelShape
    global_batch_size: int
    precision: str | None
    """From the config's top-level ``precision`` when it is bf16/fp8/fp32; None otherwise (auto)."""
    configured: Candidate | None = None
    """The layout the config itself asks for (parallel.*, micro batch, recompute) on ``world_size`` GPUs."""
    note: str | None = None
    """What the plan could not take from the config (e.g. document lengths of sources not prepared yet)."""


def configured_candidate(config: RootConfig, world_size: int) -> Candidate | None:
    """The config's own layout as a planner candidate; None if its TP x PP x CP does not divide the world."""
    p = config.parallel
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        return None
    return Candidate(p.tensor, p.pipeline, p.virtual_pipeline or 1, p.context, world_size // model_parallel,
                     config.train.micro_batch_size, config.model.recompute, config.optimizer.distributed != "false")


# Keys a plan must be given: the schema's defaults describe a 2-layer test model, not the one to plan.
REQUIRED_KEYS = ("model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.vocab_size",
                 "model.seq_length", "train.global_batch_size")


def load_plan_inputs(path: str | None, overrides: list[str] | None = None, world_size: int | None = None) -> PlanInputs:
    """The model and batch of a training config: YAML + ``key=value`` overrides, loaded and validated
    exactly as ``train`` loads them (:func:`megatron_align.config.loader.load_config`)."""
    from megatron_align.config.loader import explicit_keys, load_config

    config = load_config(path, overrides)
    given = explicit_keys(path, overrides)
    missing = [key for key in REQUIRED_KEYS if key not in given]
    if missing:
        also = f"; also missing: {', '.join(missing[1:])}" if missing[1:] else ""
        raise ConfigError(f"{path or '<overrides>'}: {missing[0]} is required by the planner (set it in the YAML or "
                          f"pass {missing[0]}=...){also}")
    precision = config.precision if config.precision in PRECISIONS else None
    configured = configured_candidate(config, world_size) if world_size else None
    model, note = ModelShape.from_config(config.model), None
    if config.data.reset_attention_mask:
        from megatron_align.data.documents import run_attention_span

        try:
            model = dataclasses.replace(model, attention_span=run_attention_span(config))
            note = (f"document masking: attention span {model.attention_length:,.0f} of {model.seq_length} tokens "
                    "(from the sources' document lengths)")
        except UserError as err:
            note = f"document masking: attention counted causal over whole windows ({err})"
    return PlanInputs(model, config.train.global_batch_size, precision, configured, note)


@dataclass
class PlanOptions:
    """Assumptions of the estimate; the defaults describe a tuned Megatron-Core job on H100s."""

    precision: str = "bf16"
    """bf16 | fp8 (TE linear layers) | fp32 (CPU runs: fp32 weights, no master copy)."""
    gpus_per_node: int = 8
    """GPUs sharing one NVLink domain; TP must stay inside it."""
    compute_efficiency: float = 0.6
    """Fraction of the BF16 dense peak that GEMMs and attention reach."""
    fp8_compute_efficiency: float = 0.5
    """Fraction of the FP8 peak that FP8 GEMMs reach (casts and scaling make it lower)."""
    comm_efficiency: float = 0.8
    """Fraction of nominal link bandwidth that NCCL collectives reach."""
    collective_latency_s: float = 20e-6
    """Fixed cost per collective call."""
    overhead_gib: float = 4.0
    """CUDA context, NCCL buffers, cuBLAS/TE workspaces and allocator fragmentation per GPU."""
    sequence_parallel: bool = True
    """Megatron sequence parallelism whenever TP > 1."""
    flash_attention: bool = True
    """Fused (flash / cuDNN) core attention: no s^2 activations; required for CP > 1."""
    grad_reduce_in_fp32: bool = True
    """Reduce gradients in fp32 (4 bytes) rather than bf16."""
    overlap_grad_reduce: bool = True
    """Overlap the DP reduce with the backward (and the param gather with the forward)."""
    fp8_amax_history_len: int = 1024
    """Delayed-scaling amax history per FP8 tensor."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        for key in ("compute_efficiency", "fp8_compute_efficiency", "comm_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"plan.{key}={getattr(self, key)}: must be in (0, 1]")
        if self.gpus_per_node <= 0 or self.overhead_gib < 0:
            raise ConfigError("plan.gpus_per_node must be > 0 and plan.overhead_gib >= 0")


@dataclass(frozen=True)
class Candidate:
    """One point of the search: a parallel layout plus micro batch, recompute and optimizer sharding."""

    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    micro_batch_size: int
    recompute: str = "none"
    distributed_optimizer: bool = True

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def label(self) -> str:
        return f"TP{self.tp} PP{self.pp} VPP{self.vpp} CP{self.cp} DP{self.dp}"


@dataclass
class MemoryBreakdown:
    """Bytes on the worst GPU (the pipeline stage with the larger total)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    fp8: float
    overhead: float
    stage: str

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.fp8 + self.overhead

    def gib(self) -> dict[str, float]:
        parts = ("params", "grads", "optimizer", "activations", "fp8", "overhead", "total")
        return {k: round(getattr(self, k) / GIB, 3) for k in parts}


@dataclass
class PlanResult:
    layout: Candidate
    memory: MemoryBreakdown
    step_time_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    tflops_per_gpu: float
    time_breakdown: dict[str, float]
    reasons: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {"layout": asdict(self.layout), "label": self.layout.label, "feasible": self.feasible,
                "reasons": self.reasons, "memory_gib": self.memory.gib(), "peak_stage": self.memory.stage,
                "step_time_s": self.step_time_s, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "mfu": self.mfu, "tflops_per_gpu": self.tflops_per_gpu, "time_breakdown_s": self.time_breakdown}


# ---------------------------------------------------------------- memory
def _weight_bytes(options: PlanOptions, distributed: bool, shard: int) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per parameter; DDP's grad buffer has the dtype of the reduction."""
    if options.precision == "fp32":
        return 4.0, 4.0, 8.0 / (shard if distributed else 1)
    return 2.0, 4.0 if options.grad_reduce_in_fp32 else 2.0, 12.0 / (shard if distributed else 1)


def stage_parameters(model: ModelShape, layout: Candidate, last: bool) -> float:
    """Parameters held by one GPU of the first (last=False) or last pipeline stage."""
    t, h = layout.tp, model.hidden_size
    layers = math.ceil(model.num_layers / layout.pp)
    params = layers * (model.linear_params_per_layer() / t + 2 * h)
    embedding = model.padded_vocab(t) * h / t
    first = not last or layout.pp == 1
    if first:
        params += embedding
    if last or layout.pp == 1:
        params += h  # final norm
        if not model.tie_embeddings or layout.pp > 1:
            params += embedding  # output layer (a tied one is copied to the last stage when PP > 1)
    return params


def layer_activation_bytes(model: ModelShape, layout: Candidate, options: PlanOptions) -> tuple[float, float]:
    """(bytes one layer keeps for backward, bytes of a fully materialised layer) for one micro batch."""
    h, t = model.hidden_size, layout.tp
    s, b = model.seq_length / layout.cp, layout.micro_batch_size
    sp = t if (options.sequence_parallel and t > 1) else 1
    act = 4.0 if options.precision == "fp32" else 2.0
    scale = act / 2  # coefficients below are for 2-byte activations
    mask = 1.0 if model.hidden_dropout > 0 else 0.0
    r_q, r_kv, r_f = model.q_size / h, model.kv_size / h, model.ffn_hidden_size / h
    fp8 = options.precision == "fp8"
    gemm_input = 1.0 if fp8 else 2 * scale  # TE saves the FP8 cast of an FP8 GEMM's input, not the bf16 tensor
    replicated = scale * 4 + 2 * gemm_input + 2 * mask  # norm inputs; QKV and fc1 inputs (norm outputs); masks
    attention = scale * (2 * r_q + 4 * r_kv + 2 * r_q) + (r_q if fp8 else 0.0)  # Q, K, V, output; FP8 proj input
    mlp = scale * (4 if model.gated_linear_unit else 2) * r_f + gemm_input * r_f  # activation input, fc2 input
    split = attention + mlp
    if options.flash_attention:
        split += 4 * model.num_attention_heads / h  # fp32 log-sum-exp per (token, head)
        quadratic = 0.0
    else:
        quadratic = (scale * 2 + (3 if model.attention_dropout > 0 else 0)) * model.num_attention_heads * s / h
    full = s * b * h * (replicated / sp + (split + quadratic) / t)
    if layout.recompute == "none":
        return full, full
    if layout.recompute == "selective":
        return full - s * b * h * quadratic / t, full
    return s * b * h * act / sp, full  # full recompute: keep the layer input only


def _chunks_in_flight(layout: Candidate, rank: int, num_microbatches: int) -> int:
    pp, vpp = layout.pp, layout.vpp
    if vpp == 1:
        return max(1, min(num_microbatches, pp - rank))
    warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp
    return max(1, min(num_microbatches * vpp, warmup + 1))


def estimate_memory(
    model: ModelShape, layout: Candidate, options: PlanOptions, num_microbatches: int
) -> MemoryBreakdown:
    """Peak bytes on the worst GPU: the first and the last pipeline stage are both evaluated."""
    t = layout.tp
    w_b, g_b, o_b = _weight_bytes(options, layout.distributed_optimizer, layout.dp * layout.cp)
    kept, materialised = layer_activation_bytes(model, layout, options)
    layers_per_chunk = model.num_layers / (layout.pp * layout.vpp)
    layers_per_rank = math.ceil(model.num_layers / layout.pp)
    fp8 = 0.0
    if options.precision == "fp8":
        fp8 = layers_per_rank * (2 * model.linear_params_per_layer() / t
                                 + 4 * 3 * (options.fp8_amax_history_len + 2) * 4)
    candidates = []
    for stage, rank in (("first", 0), ("last", layout.pp - 1)):
        last = rank == layout.pp - 1
        params = stage_parameters(model, layout, last=last)
        acts = _chunks_in_flight(layout, rank, num_microbatches) * layers_per_chunk * kept
        if layout.recompute == "full":
            acts += materialised  # one layer rematerialised during its backward
        if last:
            s, b = model.seq_length / layout.cp, layout.micro_batch_size
            acts += s * b * model.padded_vocab(t) / t * 6  # bf16 logits + fp32 softmax for the loss
        candidates.append(MemoryBreakdown(params * w_b, params * g_b, params * o_b, acts, fp8,
                                          options.overhead_gib * GIB, stage if layout.pp > 1 else "only"))
    return max(candidates, key=lambda m: m.total)


# ---------------------------------------------------------------- time
def model_flops_per_step(model: ModelShape, tokens: float, tp: int = 1) -> float:
    """Model FLOPs of ``tokens`` trained tokens: the one count (:meth:`ModelShape.flops_per_token`)."""
    return model.flops_per_token(tp) * tokens


def _bandwidth(options: PlanOptions, gpu: GpuSpec, span_gpus: int) -> float:
    """Bytes/s per GPU of a group that spans ``span_gpus`` consecutive ranks."""
    link = gpu.nvlink_gb_s if span_gpus <= options.gpus_per_node else gpu.network_gb_s
    return link * 1e9 * options.comm_efficiency


def estimate_step_time(model: ModelShape, layout: Candidate, gpu: GpuSpec, options: PlanOptions,
                       global_batch_size: int) -> tuple[float, dict[str, float]]:
    t, pp, vpp, cp, dp = layout.tp, layout.pp, layout.vpp, layout.cp, layout.dp
    m = max(1, global_batch_size // (layout.micro_batch_size * dp))
    tokens_mb = layout.micro_batch_size * model.seq_length
    bf16 = gpu.peak_flops("fp32" if options.precision == "fp32" else "bf16") * options.compute_efficiency
    if options.precision == "fp8" and gpu.fp8_tflops:
        linear_rate = gpu.peak_flops("fp8") * options.fp8_compute_efficiency
    else:
        linear_rate = bf16
    lin_fwd = 2 * model.linear_params_per_layer() * tokens_mb / (t * cp)
    # causal (or document-masked: attention_length): flash skips masked blocks
    attn_fwd = 2 * model.attention_length * model.q_size * tokens_mb / (t * cp)
    passes = {"none": 3, "selective": 3, "full": 4}[layout.recompute]
    attn_passes = 3 if layout.recompute == "none" else 4
    layer_compute = passes * lin_fwd / linear_rate + attn_passes * attn_fwd / bf16
    attn_time = attn_passes * attn_fwd / bf16
    logits = 6 * model.hidden_size * model.padded_vocab(t) * tokens_mb / (t * cp) / bf16

    act_bytes = tokens_mb / cp * model.hidden_size * 2
    tp_time = 0.0
    if t > 1:
        calls = 4 + (2 if layout.recompute == "full" else 0)
        tp_time = calls * (2 * (t - 1) / t * act_bytes / _bandwidth(options, gpu, t) + options.collective_latency_s)
    cp_time = 0.0
    if cp > 1:
        chunk = 2 * (tokens_mb / cp) * model.kv_size * 2 / t
        exchanges = 3 * (cp - 1) + ((cp - 1) if layout.recompute == "full" else 0)
        cp_comm = exchanges * (chunk / _bandwidth(options, gpu, t * cp) + options.collective_latency_s)
        cp_time = max(0.0, cp_comm - attn_time)
    layers = math.ceil(model.num_layers / pp)
    per_layer = layer_compute + tp_time + cp_time
    p2p = 0.0
    if pp > 1:
        sp = t if (options.sequence_parallel and t > 1) else 1
        p2p = 2 * vpp * (act_bytes / sp / _bandwidth(options, gpu, t * cp * dp * 2) + options.collective_latency_s)
    first = layers * per_layer + p2p
    last = layers * per_layer + logits + p2p
    t_mb = max(first, last)
    pipeline = t_mb * (m + (pp - 1) / vpp)

    params = max(stage_parameters(model, layout, last=False), stage_parameters(model, layout, last=True))
    shard = dp * cp
    dp_time = 0.0
    if shard > 1:
        bw = _bandwidth(options, gpu, t * cp * dp)
        grad_bytes = 4 if options.grad_reduce_in_fp32 or options.precision == "fp32" else 2
        if layout.distributed_optimizer:
            reduce = (shard - 1) / shard * grad_bytes * params / bw
            gather = (shard - 1) / shard * (4 if options.precision == "fp32" else 2) * params / bw
        else:
            reduce, gather = 2 * (shard - 1) / shard * grad_bytes * params / bw, 0.0
        if options.overlap_grad_reduce:
            dp_time = max(0.0, reduce - t_mb * 2 / 3) + max(0.0, gather - t_mb / 3)
        else:
            dp_time = reduce + gather
    opt_params = params / shard if layout.distributed_optimizer else params
    optimizer = opt_params * 30 / (gpu.hbm_tb_s * 1e12)  # Adam reads/writes ~30 bytes per parameter
    total = pipeline + dp_time + optimizer
    breakdown = {"compute": m * layers * layer_compute + logits * m, "tp_comm": m * layers * tp_time,
                 "cp_comm_exposed": m * layers * cp_time, "pp_p2p": m * p2p,
                 "pp_bubble": t_mb * (pp - 1) / vpp, "dp_comm_exposed": dp_time, "optimizer": optimizer}
    return total, {k: round(v, 6) for k, v in breakdown.items()}


# ---------------------------------------------------------------- layouts
def layout_problems(model: ModelShape, layout: Candidate, gpu: GpuSpec, options: PlanOptions,
                    global_batch_size: int) -> list[str]:
    """Why a layout cannot run, before memory is considered (empty list: it can)."""
    t, pp, vpp, cp, dp, mbs = layout.tp, layout.pp, layout.vpp, layout.cp, layout.dp, layout.micro_batch_size
    problems = []
    if t > options.gpus_per_node:
        problems.append(f"TP={t} spans more than one node of {options.gpus_per_node} GPUs")
    if model.num_attention_heads % t:
        problems.append(f"num_attention_heads {model.num_attention_heads} % tp {t} != 0")
    if model.num_query_groups % t:
        problems.append(f"num_query_groups {model.num_query_groups} % tp {t} != 0")
    if model.ffn_hidden_size % t:
        problems.append(f"ffn_hidden_size {model.ffn_hidden_size} % tp {t} != 0")
    if model.num_layers % (pp * vpp):
        problems.append(f"num_layers {model.num_layers} % (pp*vpp = {pp * vpp}) != 0")
    if vpp > 1 and pp == 1:
        problems.append("virtual pipeline needs pp > 1")
    if global_batch_size % (mbs * dp):
        problems.append(f"global_batch_size {global_batch_size} % (micro_batch {mbs} * dp {dp} = {mbs * dp}) != 0")
    elif vpp > 1 and (global_batch_size // (mbs * dp)) % pp:
        problems.append(f"interleaved schedule needs num_microbatches {global_batch_size // (mbs * dp)} % pp {pp} == 0")
    if cp > 1 and model.seq_length % (2 * cp):
        problems.append(f"seq_length {model.seq_length} % (2*cp = {2 * cp}) != 0")
    if cp > 1 and not options.flash_attention:
        problems.append("context parallelism needs fused (flash) attention")
    if t > 1 and options.sequence_parallel and (model.seq_length // cp) % t:
        problems.append(f"sequence parallel needs seq_length/cp {model.seq_length // cp} % tp {t} == 0")
    if options.precision == "fp8" and not gpu.fp8_tflops:
        problems.append(f"fp8 needs FP8 tensor cores, which {gpu.name} lacks")
    return problems


def evaluate_layout(model: ModelShape, layout: Candidate, gpu: GpuSpec, options: PlanOptions,
                    global_batch_size: int) -> PlanResult:
    reasons = layout_problems(model, layout, gpu, options, global_batch_size)
    m = max(1, global_batch_size // (layout.micro_batch_size * layout.dp))
    memory = estimate_memory(model, layout, options, m)
    if memory.total > gpu.memory_gib * GIB:
        reasons.append(f"OOM: {memory.total / GIB:.1f} GiB > {gpu.memory_gib:.1f} GiB ({memory.stage} stage)")
    step, breakdown = estimate_step_time(model, layout, gpu, options, global_batch_size)
    world = layout.world_size
    tokens = global_batch_size * model.seq_length
    flops = model_flops_per_step(model, tokens, layout.tp)
    peak = gpu.peak_flops(options.precision) or gpu.peak_flops("bf16")
    achieved = flops / (step * world)
    return PlanResult(layout, memory, step, tokens / step / world, achieved / peak, achieved / 1e12, breakdown, reasons)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(world_size: int, model: ModelShape, micro_batch_sizes: tuple[int, ...] = (1, 2, 4),
                      max_tp: int = 8) -> list[Candidate]:
    """TP in the divisors of the world up to ``max_tp``, then PP; VPP in the divisors of the layers per stage
    (80 layers on PP8: 1, 2, 5, 10); CP in {1,2,4,8}; DP the rest."""
    layouts = []
    for tp in (d for d in _divisors(world_size) if d <= max_tp):
        for pp in (d for d in _divisors(world_size // tp) if d <= model.num_layers):
            even = pp > 1 and model.num_layers % pp == 0
            vpps = _divisors(model.num_layers // pp) if even else [1]
            for vpp, cp in itertools.product(vpps, (1, 2, 4, 8)):
                if (world_size // (tp * pp)) % cp:
                    continue
                dp = world_size // (tp * pp * cp)
                for mbs, rc, dopt in itertools.product(micro_batch_sizes, RECOMPUTE_CHOICES, (False, True)):
                    layouts.append(Candidate(tp, pp, vpp, cp, dp, mbs, rc, dopt))
    return layouts


def plan(model: ModelShape, world_size: int, gpu: GpuSpec, global_batch_size: int,
         options: PlanOptions | None = None, micro_batch_sizes: tuple[int, ...] = (1, 2, 4)) -> list[PlanResult]:
    """Every candidate layout, feasible ones first ranked by step time, then infeasible ones by memory."""
    if world_size <= 0:
        raise UserError(f"--gpus={world_size}: must be a positive number of GPUs")
    options = options or PlanOptions()
    results = [
        evaluate_layout(model, layout, gpu, options, global_batch_size)
        for layout in enumerate_layouts(world_size, model, micro_batch_sizes, max_tp=max(8, options.gpus_per_node))
    ]
    return sorted(results, key=lambda r: (not r.feasible, r.step_time_s if r.feasible else 0.0, r.memory.total,
                                          r.layout.tp * r.layout.pp * r.layout.cp))
