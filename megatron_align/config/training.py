"""Training-side configs: parallel layout, run length, optimizer and LR schedule, checkpoints, logging.

Every field carries a docstring; ``__post_init__`` checks values and raises a :class:`ConfigError` naming
the dotted key. Checks that need the world size (the parallel layout) live in
:mod:`megatron_align.parallel.layout` and run before any process group forms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_align.config.checks import choice, positive, tristate
from megatron_align.errors import ConfigError


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
            positive(f"parallel.{key}", getattr(self, key))
        positive("parallel.virtual_pipeline", self.virtual_pipeline)
        choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))
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
            positive(f"train.{key}", getattr(self, key))
        positive("train.stop_at_step", self.stop_at_step)


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
        positive("optimizer.lr", self.lr)
        positive("optimizer.min_lr", self.min_lr, allow_zero=True)
        positive("optimizer.warmup_steps", self.warmup_steps, allow_zero=True)
        positive("optimizer.decay_steps", self.decay_steps)
        positive("optimizer.wsd_decay_steps", self.wsd_decay_steps)
        positive("optimizer.weight_decay", self.weight_decay, allow_zero=True)
        positive("optimizer.clip_grad", self.clip_grad, allow_zero=True)
        choice("optimizer.decay_style", self.decay_style, ("cosine", "linear", "constant", "WSD"))
        choice("optimizer.wsd_decay_style", self.wsd_decay_style, ("linear", "cosine", "exponential", "minus_sqrt"))
        self.distributed = tristate("optimizer.distributed", self.distributed)
        if self.min_lr > self.lr:
            raise ConfigError(f"optimizer.min_lr={self.min_lr} exceeds optimizer.lr={self.lr}")
        for key in ("adam_beta1", "adam_beta2"):  # torch.optim.Adam raises a bare ValueError on these
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optimizer.{key}={getattr(self, key)}: must be in [0, 1), e.g. 0.9 / 0.95")
        positive("optimizer.adam_eps", self.adam_eps)



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
    """Start from this checkpoint (a dir with iter_* or one iter_* dir) when run_dir has none, e.g. a pretrained
    model for midtraining; a Megatron-LM or Megatron-Bridge torch_dist checkpoint too (its model config is used)."""
    load_optimizer: bool = True
    """With checkpoint.load: also restore optimizer, scheduler and data position (false = weights only, fresh run)."""
    async_save: str = "auto"
    """Write in the background: auto (on with CUDA) | true | false."""
    format: str = "megatron_align"
    """megatron_align | megatron_lm: also write Megatron-LM's envelope (args, iteration, opt_param_scheduler,
    rng_state, latest_checkpointed_iteration.txt), so that Megatron-LM's load_checkpoint resumes the run."""
    data_position: str = "restart"
    """With checkpoint.load from a Megatron-LM/Bridge checkpoint: restart (this run's data starts at sample 0) |
    continue (at the checkpoint's consumed_train_samples)."""
    async_writer: str = "auto"
    """The background writer: auto (nvidia-resiliency-ext's where Megatron-Core offers it and it imports, else
    Megatron-Core's own) | mcore | nvrx (an error where it cannot run). ``megatron-align doctor`` says which."""

    def __post_init__(self) -> None:
        choice("checkpoint.async_writer", self.async_writer, ("auto", "mcore", "nvrx"))
        choice("checkpoint.format", self.format, ("megatron_align", "megatron_lm"))
        choice("checkpoint.data_position", self.data_position, ("restart", "continue"))
        positive("checkpoint.interval", self.interval, allow_zero=True)
        positive("checkpoint.keep_last", self.keep_last)
        positive("checkpoint.keep_every", self.keep_every)
        self.async_save = tristate("checkpoint.async_save", self.async_save)


@dataclass
class LoggingConfig:
    interval: int = 1
    """Write a metrics.jsonl record and a console line every N steps."""
    level: str = "INFO"
    """Log level for <run_dir>/train.log and the console."""

    def __post_init__(self) -> None:
        positive("logging.interval", self.interval)
        choice("logging.level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class RunLockConfig:
    heartbeat_s: float = 10.0
    """How often the holder rewrites run_dir/run.lock (its heartbeat)."""
    stale_after_s: float = 120.0
    """A lease from another host whose heartbeat is older than this is taken over (with a warning). On the same
    host a dead holder is detected at once from its pid. Keep it well above heartbeat_s and filesystem
    attribute-cache delays (NFS actimeo)."""

    def __post_init__(self) -> None:
        positive("run_lock.heartbeat_s", self.heartbeat_s)
        positive("run_lock.stale_after_s", self.stale_after_s)
        if self.stale_after_s < 2 * self.heartbeat_s:
            raise ConfigError(f"run_lock.stale_after_s={self.stale_after_s}: must be at least twice "
                              f"run_lock.heartbeat_s={self.heartbeat_s} (or a live holder looks stale)")


@dataclass
class ProfileConfig:
    """Profiling a step range (megatron_align.training.profiling)."""

    mode: str = "none"
    """none | torch (torch profiler Chrome traces per rank) | nsys (cudaProfilerApi start/stop for nsys; CUDA)."""
    start_step: int = 2
    """First profiled step (after warm-up: the first steps include allocation and compilation)."""
    end_step: int = 3
    """Last profiled step (inclusive)."""
    ranks: list[int] = field(default_factory=list)
    """Ranks that profile; [] = every rank."""
    record_shapes: bool = False
    """torch mode: record operator input shapes."""
    with_stack: bool = False
    """torch mode: record Python stacks (larger traces, more overhead)."""
    nvtx: str = "auto"
    """NVTX ranges around data / forward_backward / optimizer / checkpoint: auto (on with CUDA when mode != none),
    true, false."""
    memory_snapshot_step: int = 0
    """CUDA: record the allocator history and dump a snapshot after this step (0 = off)."""
    memory_snapshot_on_oom: bool = False
    """CUDA: record the allocator history and dump a snapshot when a step runs out of memory."""

    def __post_init__(self) -> None:
        choice("profile.mode", self.mode, ("none", "torch", "nsys"))
        self.nvtx = tristate("profile.nvtx", self.nvtx)
        if self.start_step < 1 or self.end_step < self.start_step:
            raise ConfigError(f"profile.start_step={self.start_step}, end_step={self.end_step}: need "
                              "1 <= start_step <= end_step")
        if any(r < 0 for r in self.ranks):
            raise ConfigError(f"profile.ranks={self.ranks}: ranks are >= 0")
        positive("profile.memory_snapshot_step", self.memory_snapshot_step, allow_zero=True)
