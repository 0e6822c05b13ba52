"""The root config: one typed dataclass per area, composed here.

Every field carries a docstring; ``__post_init__`` checks values and raises a
:class:`ConfigError` naming the dotted key. Checks that need the world size
(the parallel layout) live in :mod:`megatron_align.parallel.layout` and run
before any process group forms. Later areas (mixture, resilience, eval,
tracking) add a field here and their own dataclass next to their code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_align.data.mixture import MixtureConfig
from megatron_align.data.tokenizer import TokenizerConfig
from megatron_align.errors import ConfigError
from megatron_align.eval.config import EvalConfig
from megatron_align.model.fp8 import FP8Config
from megatron_align.resilience.config import ResilienceConfig
from megatron_align.slurm import SlurmConfig
from megatron_align.tracking.config import TrackingConfig


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")


def _tristate(key: str, value: str) -> str:
    """auto | true | false; YAML/CLI booleans arrive as 'True'/'False' strings after omegaconf's str coercion."""
    normalized = str(value).strip().lower()
    _choice(key, normalized, ("auto", "true", "false"))
    return normalized


def _positive(key: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value}: must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class ModelConfig:
    num_layers: int = 2
    """Transformer layers (split over pipeline stages)."""
    hidden_size: int = 64
    """Model width h."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width; default: 8h/3 rounded up to a multiple of 64 (Llama)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for GQA; None = multi-head attention (one group per head)."""
    kv_channels: int | None = None
    """Head dim (Megatron-Core's kv_channels); None = hidden_size / num_attention_heads. Set it where a model's
    heads are wider or narrower than that (Qwen3-0.6B: hidden 1024, 16 heads of 128; Mistral-Nemo: 5120, 32 x 128)."""
    seq_length: int = 128
    """Training sequence length in tokens."""
    vocab_size: int | None = None
    """Tokenizer vocabulary; None = take it from data.tokenizer. Padded for TP (below)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding rows are padded to a multiple of this x parallel.tensor."""
    rotary_base: int = 10000
    """RoPE theta (Llama 3 uses 500000)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    spec: str = "auto"
    """Layer implementation: auto (te on a GPU with Transformer Engine, else local) | local | te | portable (torch SDPA)."""
    recompute: str = "none"
    """Activation recompute: none | selective (core attention) | full (whole layers)."""
    rope_scaling: str = "none"
    """RoPE frequency scaling: none | llama3 (Llama 3.1+; Megatron-Core's rope_scaling, low/high frequency factors
    1 and 4 and original context 8192 fixed there)."""
    rope_scaling_factor: float = 8.0
    """model.rope_scaling=llama3: the scaling factor (Llama 3.1: 8, Llama 3.2: 32)."""
    add_qkv_bias: bool = False
    """Biases on the query/key/value projections (Qwen2 / Qwen2.5); Megatron-Core's add_qkv_bias."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3); Megatron-Core's qk_layernorm."""
    hf_family: str = "llama"
    """The Hugging Face architecture `convert to-hf` writes: llama | mistral | qwen2 | qwen3 (`convert from-hf` sets
    it to the family it read). Training ignores it."""

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "make_vocab_size_divisible_by", "rotary_base"):
            _positive(f"model.{key}", getattr(self, key))
        _positive("model.ffn_hidden_size", self.ffn_hidden_size)
        _positive("model.num_query_groups", self.num_query_groups)
        _positive("model.kv_channels", self.kv_channels)
        _positive("model.vocab_size", self.vocab_size)
        _positive("model.norm_epsilon", self.norm_epsilon)
        _choice("model.spec", self.spec, ("auto", "local", "te", "portable"))
        _choice("model.recompute", self.recompute, ("none", "selective", "full"))
        _choice("model.rope_scaling", self.rope_scaling, ("none", "llama3"))
        _positive("model.rope_scaling_factor", self.rope_scaling_factor)
        _choice("model.hf_family", self.hf_family, ("llama", "mistral", "qwen2", "qwen3"))
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by model.num_attention_heads="
                              f"{self.num_attention_heads} (or set model.kv_channels, the head dim)")
        if self.kv_channels is not None and self.kv_channels % 2:
            raise ConfigError(f"model.kv_channels={self.kv_channels}: must be even (RoPE rotates pairs of channels)")
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} must be divisible by model.num_query_groups={self.num_query_groups}")

    @property
    def head_dim(self) -> int:
        """kv_channels, or hidden_size / num_attention_heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """ffn_hidden_size, or the Llama default 8h/3 rounded up to a multiple of 64."""
        return self.ffn_hidden_size or -(-(8 * self.hidden_size // 3) // 64) * 64


@dataclass
class ParallelConfig:
    world_size: int = 1
    """Ranks to spawn when run standalone; under torchrun/srun the launcher's world size is used."""
    tensor: int = 1
    """Tensor-parallel size (keep within one NVLink node)."""
    pipeline: int = 1
    """Pipeline-parallel stages."""
    context: int = 1
    """Context-parallel size (splits the sequence; needs the te spec)."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline stage (interleaved 1F1B); None = 1."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside TP regions (needs tensor > 1)."""
    backend: str = "auto"
    """Process-group backend: auto (nccl with CUDA, else gloo) | nccl | gloo."""
    timeout_minutes: int = 30
    """Collective timeout; a hung collective fails after this."""
    cpu_threads: int = 1
    """torch intra-op threads per rank on a CPU-only host (ignored with CUDA). Keep ranks x threads <= cores."""

    def __post_init__(self) -> None:
        for key in ("world_size", "tensor", "pipeline", "context", "timeout_minutes", "cpu_threads"):
            _positive(f"parallel.{key}", getattr(self, key))
        _positive("parallel.virtual_pipeline", self.virtual_pipeline)
        _choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor > 1")
        if self.virtual_pipeline and self.virtual_pipeline > 1 and self.pipeline == 1:
            raise ConfigError("parallel.virtual_pipeline > 1 needs parallel.pipeline > 1")


@dataclass
class TrainConfig:
    steps: int = 10
    """Optimizer steps in the whole run (the LR schedule's horizon unless optimizer.decay_steps is set)."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one rank; gradient accumulation makes up the rest."""
    seed: int = 1234
    """Seed for init, data order and every RNG."""
    stop_at_step: int | None = None
    """Save a checkpoint and exit cleanly once this step completes (time-sliced jobs, tests)."""

    def __post_init__(self) -> None:
        for key in ("steps", "global_batch_size", "micro_batch_size"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.stop_at_step", self.stop_at_step)


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Final learning rate after decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    decay_style: str = "cosine"
    """LR decay after warmup: cosine | linear | constant | WSD (warmup-stable-decay)."""
    decay_steps: int | None = None
    """Steps over which the LR decays (incl. warmup); default train.steps."""
    wsd_decay_steps: int | None = None
    """WSD only: length of the final decay (e.g. the midtraining phase); default 10% of decay_steps."""
    wsd_decay_style: str = "linear"
    """WSD only: shape of the final decay: linear | cosine | exponential | minus_sqrt."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    distributed: str = "auto"
    """Shard optimizer state over data-parallel ranks: auto (on with CUDA) | true | false."""
    override_scheduler: bool = True
    """On resume, when lr/min_lr/warmup_steps/decay_steps/decay_style differ from the checkpoint's: follow this
    config (logged, the step count kept: extending or re-decaying a run) | false = refuse to resume, naming the keys."""

    def __post_init__(self) -> None:
        _positive("optimizer.lr", self.lr)
        _positive("optimizer.min_lr", self.min_lr, allow_zero=True)
        _positive("optimizer.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("optimizer.decay_steps", self.decay_steps)
        _positive("optimizer.wsd_decay_steps", self.wsd_decay_steps)
        _positive("optimizer.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optimizer.clip_grad", self.clip_grad, allow_zero=True)
        _choice("optimizer.decay_style", self.decay_style, ("cosine", "linear", "constant", "WSD"))
        _choice("optimizer.wsd_decay_style", self.wsd_decay_style, ("linear", "cosine", "exponential", "minus_sqrt"))
        self.distributed = _tristate("optimizer.distributed", self.distributed)
        if self.min_lr > self.lr:
            raise ConfigError(f"optimizer.min_lr={self.min_lr} exceeds optimizer.lr={self.lr}")
        for key in ("adam_beta1", "adam_beta2"):  # torch.optim.Adam raises a bare ValueError on these
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optimizer.{key}={getattr(self, key)}: must be in [0, 1), e.g. 0.9 / 0.95")
        _positive("optimizer.adam_eps", self.adam_eps)


@dataclass
class SourceConfig:
    name: str = "web"
    """Source name (used in mixtures, metrics and manifests)."""
    prefix: str = ""
    """Megatron IndexedDataset path prefix (without .bin/.idx), as written by `megatron-align prepare`."""
    weight: float = 1.0
    """Blend weight when no phase mixture is configured."""
    num_samples: int | None = None
    """Planning only: samples per epoch for `data inspect` before the data is prepared (training counts the real data)."""


@dataclass
class DataConfig:
    mock: bool = False
    """Random tokens (Megatron-Core MockGPTDataset) for benchmarks; ignores sources."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Tokenized sources."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer that produced the sources (its identity is checked against manifests)."""
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    """Phase-scheduled alignment mixture over data.sources (empty phases = blend sources by their weight)."""
    cache_dir: str | None = None
    """Where Megatron-Core caches dataset indices; default <run_dir>/data_cache."""
    heldout_percent: float = 0.0
    """Percent of each source's documents held out of training for held-out loss (0 = none)."""
    heldout_interval: int = 0
    """Log held-out loss per source (``heldout_loss/<source>``) every N steps (0 = never)."""
    heldout_samples: int = 0
    """Held-out sequences evaluated per source; default (0) = train.global_batch_size."""
    loader: str = "torch"
    """Microbatch delivery: torch (in-process) | dali (NVIDIA DALI pipeline with prefetch; GPU output on GPU)."""
    prefetch: int = 2
    """data.loader=dali: microbatches kept in flight."""

    def require_sources(self) -> None:
        """Called before training starts (not at schema build, where defaults are empty)."""
        if not self.mock and not self.sources:
            raise ConfigError("data.sources: empty; list at least one {name, prefix} or set data.mock=true")

    def __post_init__(self) -> None:
        _choice("data.loader", self.loader, ("torch", "dali"))
        if not 0 <= self.heldout_percent < 50:
            raise ConfigError(f"data.heldout_percent={self.heldout_percent}: expected a percentage in [0, 50)")
        _positive("data.heldout_interval", self.heldout_interval, allow_zero=True)
        _positive("data.heldout_samples", self.heldout_samples, allow_zero=True)
        if self.heldout_interval and not self.heldout_percent:
            raise ConfigError("data.heldout_interval > 0 needs data.heldout_percent > 0 (documents to hold out)")
        _positive("data.prefetch", self.prefetch)
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: duplicate source names {names}")
        if self.mixture.phases:
            if self.mock:
                raise ConfigError("data.mixture needs real data.sources; it cannot be combined with data.mock=true")
            self.mixture.check_sources(names)
        for i, src in enumerate(self.sources):
            if not src.prefix and not self.mock and src.num_samples is None:
                raise ConfigError(f"data.sources[{i}].prefix: required (path prefix of a .bin/.idx pair)")
            _positive(f"data.sources[{i}].weight", src.weight, allow_zero=True)
        if self.sources and not self.mixture.phases and not any(s.weight for s in self.sources):
            # Megatron-Core's blend normalises by the sum: all zero would give NaN weights
            raise ConfigError("data.sources[*].weight: all zero; give at least one source a weight > 0")


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every N steps (0 = only at the end and on a stop signal)."""
    keep_last: int = 3
    """Keep the newest N complete checkpoints ..."""
    keep_every: int | None = None
    """... plus every checkpoint whose step is a multiple of this (None = none extra)."""
    dir: str | None = None
    """Checkpoint directory; default <run_dir>/checkpoints."""
    load: str | None = None
    """Start from this checkpoint (a dir with iter_* or one iter_* dir) when run_dir has none, e.g. a pretrained model for midtraining."""
    load_optimizer: bool = True
    """With checkpoint.load: also restore optimizer, scheduler and data position (false = weights only, fresh run)."""
    async_save: str = "auto"
    """Write in the background: auto (on with CUDA) | true | false."""

    def __post_init__(self) -> None:
        _positive("checkpoint.interval", self.interval, allow_zero=True)
        _positive("checkpoint.keep_last", self.keep_last)
        _positive("checkpoint.keep_every", self.keep_every)
        self.async_save = _tristate("checkpoint.async_save", self.async_save)


@dataclass
class LoggingConfig:
    interval: int = 1
    """Write a metrics.jsonl record and a console line every N steps."""
    level: str = "INFO"
    """Log level for <run_dir>/train.log and the console."""

    def __post_init__(self) -> None:
        _positive("logging.interval", self.interval)
        _choice("logging.level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class RootConfig:
    run_dir: str = "runs/default"
    """Everything the run writes goes here: config.yaml, metrics.jsonl, train.log, checkpoints/."""
    precision: str = "auto"
    """auto (bf16 with CUDA, fp32 on CPU) | fp32 | bf16 | fp8 (bf16 weights, FP8 GEMMs through Transformer Engine; see fp8.*)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Job-script settings for `megatron-align slurm render` (nodes, partition, account, time, container)."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 recipe settings, used when precision=fp8 (megatron_align/model/fp8.py)."""

    def __post_init__(self) -> None:
        _choice("precision", self.precision, ("auto", "fp32", "bf16", "fp8"))
        if not self.run_dir:
            raise ConfigError("run_dir: must be a non-empty path")
        if self.train.stop_at_step and self.train.stop_at_step > self.train.steps:
            raise ConfigError(f"train.stop_at_step={self.train.stop_at_step} is beyond train.steps={self.train.steps}")
        from megatron_align.training.schedule import resolve_schedule

        resolve_schedule(self.optimizer, self.train.steps)  # Megatron-Core's scheduler asserts; we name the keys
