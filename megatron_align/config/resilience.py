"""Config of megatron_align.resilience (composed into the root config as ``resilience:``).

In-rank detectors (straggler, health, numerics, trajectory) run as trainer callbacks; the supervisor that wraps
the job from outside (``resilience.supervisor``) and the heartbeats it watches (``resilience.heartbeat``) have
their own sections. Cheap detectors are on by default (straggler
timing, NaN/spike checks, loss trajectory, NVML when pynvml and a GPU are present, a tiny
collective check); the ones that cost a GEMM or a pass over the weights (SDC, parameter hash)
are off until given an interval. An interval of 0 turns a check off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_align.config.checks import at_least, choice, fraction, positive, tristate
from megatron_align.errors import ConfigError
from megatron_align.resilience.protocol.faults import parse_faults

_POLICIES = ("log", "exclude_on_restart", "stop")
STRAGGLER_SECTIONS = ("data", "forward_backward", "forward_compute", "optimizer", "checkpoint")


@dataclass
class StragglerConfig:
    interval: int = 100
    """Steps between score computations (one all_gather of a few floats); 0 = off."""
    warmup_steps: int = 5
    """Steps after (re)start whose timings are ignored (allocator, caches, first checkpoint)."""
    relative_threshold: float = 0.75
    """Flag a rank whose section median is slower than best-peer-median / this (score = best / own < threshold)."""
    individual_threshold: float = 0.75
    """Flag a rank whose current median is slower than its own best recent median / this."""
    history: int = 10
    """Intervals of this rank's medians kept for the individual score's 'best recent'."""
    min_section_seconds: float = 0.002
    """Sections faster than this on a rank are not scored (noise dominates sub-millisecond timings)."""
    sections: list[str] = field(default_factory=lambda: list(STRAGGLER_SECTIONS))
    """Sections scored: data, forward_backward, forward_compute (the model forward alone, timed by hooks on
    the model chunks: no data-parallel collective inside, so a slow GPU shows there even when the gradient
    all-reduce equalises forward_backward), optimizer, checkpoint."""
    clock: str = "auto"
    """How forward_backward, optimizer and forward_compute are timed: auto (cuda on GPU, cpu otherwise) |
    cuda (CUDA events: GPU time, not kernel-launch time) | cpu (process CPU seconds: immune to a shared
    machine's scheduler) | wall. data and checkpoint are always the trainer's wall clock."""
    policy: str = "log"
    """What a flagged rank triggers: log | exclude_on_restart (hostname -> <run_dir>/exclude_nodes.txt) |
    stop (exclude + checkpoint + exit 86 so the supervisor restarts without the node)."""
    patience: int = 2
    """Consecutive reports a rank must be blamed in before the policy acts (every flag is logged)."""

    def __post_init__(self) -> None:
        for key in ("interval", "warmup_steps"):
            at_least(f"resilience.straggler.{key}", getattr(self, key), 0)
        for key in ("history", "patience"):
            at_least(f"resilience.straggler.{key}", getattr(self, key), 1)
        fraction("resilience.straggler.relative_threshold", self.relative_threshold)
        fraction("resilience.straggler.individual_threshold", self.individual_threshold)
        at_least("resilience.straggler.min_section_seconds", self.min_section_seconds, 0.0)
        choice("resilience.straggler.policy", self.policy, _POLICIES)
        choice("resilience.straggler.clock", self.clock, ("auto", "cuda", "cpu", "wall"))
        for i, section in enumerate(self.sections):
            choice(f"resilience.straggler.sections[{i}]", section, STRAGGLER_SECTIONS)


@dataclass
class HealthConfig:
    policy: str = "log"
    """What a failed check triggers: log | exclude_on_restart | stop (exit 86, restart without the node)."""
    nvml_interval: int = 100
    """Steps between NVML queries of this rank's GPU (no-op without pynvml or CUDA); 0 = off."""
    max_temperature_c: float = 90.0
    """GPU temperature above this is a warning."""
    min_clock_ratio: float = 0.5
    """SM clock below this fraction of its maximum while throttled is a warning."""
    sdc_interval: int = 0
    """Steps between silent-data-corruption GEMM checks; 0 = off."""
    sdc_size: int = 1024
    """The SDC check multiplies two seeded sdc_size x sdc_size fp32 matrices (3 x 4 MB at 1024)."""
    sdc_seed: int = 1234
    """Seed of the SDC check's inputs (identical on every rank)."""
    collective_interval: int = 100
    """Steps between all-reduces of known values verified exactly (world, data- and tensor-parallel groups); 0 = off."""
    param_hash_interval: int = 0
    """Steps between cross-data-parallel-replica parameter hash comparisons (a pass over the weights); 0 = off."""

    def __post_init__(self) -> None:
        choice("resilience.health.policy", self.policy, _POLICIES)
        for key in ("nvml_interval", "sdc_interval", "collective_interval", "param_hash_interval"):
            at_least(f"resilience.health.{key}", getattr(self, key), 0)
        at_least("resilience.health.sdc_size", self.sdc_size, 16)
        fraction("resilience.health.min_clock_ratio", self.min_clock_ratio)


@dataclass
class NumericsConfig:
    nan_policy: str = "skip"
    """NaN/Inf loss: skip (drop the step's update) | stop (skip it, checkpoint, exit 87) | log.
    A non-finite grad norm (the update is already applied) stops without saving unless policy is log."""
    max_consecutive_skips: int = 5
    """More skipped steps in a row than this stops the run (exit 87): the weights are likely diverged."""
    spike_factor: float = 10.0
    """A loss above spike_factor x the max of the recent window is a spike (Megatron's rerun default); 0 = off."""
    spike_window: int = 50
    """Recent (non-skipped) steps whose max loss the spike test compares against."""
    spike_policy: str = "log"
    """Loss spike: log | skip | stop."""

    def __post_init__(self) -> None:
        choice("resilience.numerics.nan_policy", self.nan_policy, ("skip", "stop", "log"))
        choice("resilience.numerics.spike_policy", self.spike_policy, ("skip", "stop", "log"))
        at_least("resilience.numerics.max_consecutive_skips", self.max_consecutive_skips, 1)
        at_least("resilience.numerics.spike_factor", self.spike_factor, 0.0)
        if 0 < self.spike_factor <= 1:
            raise ConfigError(f"resilience.numerics.spike_factor={self.spike_factor}: must be > 1 (or 0 = off)")
        at_least("resilience.numerics.spike_window", self.spike_window, 1)


@dataclass
class TrajectoryConfig:
    interval: int = 50
    """Steps between checks of the smoothed loss against the power-law fit; 0 = off."""
    warmup_steps: int = 100
    """Steps (after start or a data-phase change) before points enter the fit."""
    smoothing: float = 0.9
    """EMA factor of the smoothed loss (bias-corrected)."""
    band: float = 0.05
    """Relative deviation above the fit's prediction that counts (0.05 = 5% worse than predicted)."""
    patience: int = 3
    """Consecutive deviating checks before the run is flagged."""
    min_points: int = 6
    """Fit points needed before predictions are trusted."""
    policy: str = "log"
    """When flagged: log | stop (exit 87)."""

    def __post_init__(self) -> None:
        at_least("resilience.trajectory.interval", self.interval, 0)
        at_least("resilience.trajectory.warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"resilience.trajectory.smoothing={self.smoothing}: must be in [0, 1)")
        at_least("resilience.trajectory.band", self.band, 0.0)
        at_least("resilience.trajectory.patience", self.patience, 1)
        at_least("resilience.trajectory.min_points", self.min_points, 3)
        choice("resilience.trajectory.policy", self.policy, ("log", "stop"))


@dataclass
class HeartbeatConfig:
    """Per-rank heartbeat files (``<run_dir>/heartbeats/rank_<R>.json``) and stack dumps on SIGUSR2."""

    enabled: str = "auto"
    """auto (on when started by `megatron-align launch`) | true | false."""
    min_interval_s: float = 0.2
    """At most one heartbeat write per rank per this many seconds (a background thread flushes the newest)."""

    def __post_init__(self) -> None:
        self.enabled = tristate("resilience.heartbeat.enabled", self.enabled)
        at_least("resilience.heartbeat.min_interval_s", self.min_interval_s, 0.0)


@dataclass
class SupervisorConfig:
    """How `megatron-align launch` restarts a run, detects hangs and gives up."""

    max_restarts: int = 5
    """Restarts allowed in this launch (0 = supervise and report, never restart)."""
    max_restarts_per_hour: int = 6
    """Stop when more restarts than this happened within the last hour (a crash loop)."""
    max_no_progress_restarts: int = 3
    """Stop after this many consecutive restarts that did not commit a newer checkpoint."""
    backoff_s: float = 10.0
    """Delay before the first restart; doubles for each consecutive restart without progress."""
    backoff_max_s: float = 300.0
    """Upper bound of the restart delay."""
    initial_timeout_s: float = 900.0
    """Hang timeout until ``warmup_steps`` steps were seen: start-up, checkpoint load, first steps."""
    warmup_steps: int = 5
    """Steps observed before the step timeout is derived from measured step times."""
    safety_factor: float = 5.0
    """Step timeout = safety_factor x the longest step observed after warm-up."""
    min_timeout_s: float = 60.0
    """Floor of the derived step timeout (scheduling jitter on very short steps)."""
    between_steps_timeout_s: float = 900.0
    """Timeout while a rank is between steps (checkpoint save, eval); grows to safety_factor x the longest seen."""
    check_interval_s: float = 1.0
    """How often the heartbeat files are read."""
    stop_grace_s: float = 170.0
    """After forwarding SIGUSR1/SIGTERM: time for the ranks to checkpoint and exit before SIGKILL
    (keep it below the lead time of SLURM's --signal=USR1@N)."""
    term_grace_s: float = 10.0
    """Teardown after a failure: SIGTERM, wait this long, then SIGKILL."""
    attribution_wait_s: float = 5.0
    """After the first rank's failure: how long to wait for srun to report the others' ends (it ends the step
    itself with --kill-on-bad-exit), so the rank that failed first is told apart from its victims."""
    exclude_file: str = ""
    """An exclude list (one node per line, '#' comments: slurm/preflight.sbatch's format) whose nodes no attempt
    uses; slurm/pretrain.sbatch passes its MA_EXCLUDE_FILE here. Empty = only ``<run_dir>/exclude_nodes.txt``."""
    stack_dump_wait_s: float = 3.0
    """After SIGUSR2 to a hung job: time for the ranks to write their Python stacks."""
    clear_fault_injection: bool = True
    """Drop MEGATRON_ALIGN_FAULT from restarted attempts, so a drill's fault fires once, not on every attempt."""
    requeue: str = "auto"
    """On SIGUSR1/SIGTERM inside a SLURM batch job submitted with --requeue:
    auto = `scontrol requeue` the job | never."""
    srun_args: list[str] = field(default_factory=list)
    """Extra `srun` arguments for the rank step inside a SLURM allocation (e.g. pyxis --container-image=...)."""
    rank_command: str = ""
    """How srun starts `megatron-align` on the nodes (e.g. ``megatron-align`` inside a container image);
    empty = this supervisor's Python interpreter with ``-m megatron_align.cli``."""
    tasks_per_node: int = 0
    """Ranks per node for `srun --ntasks-per-node`; 0 = SLURM_NTASKS_PER_NODE of the allocation, else unset."""

    def __post_init__(self) -> None:
        for key in (
            "max_restarts",
            "max_restarts_per_hour",
            "max_no_progress_restarts",
            "warmup_steps",
            "tasks_per_node",
        ):
            at_least(f"resilience.supervisor.{key}", getattr(self, key), 0)
        for key in (
            "backoff_s",
            "backoff_max_s",
            "stop_grace_s",
            "term_grace_s",
            "stack_dump_wait_s",
            "attribution_wait_s",
        ):
            at_least(f"resilience.supervisor.{key}", getattr(self, key), 0.0)
        for key in ("initial_timeout_s", "min_timeout_s", "between_steps_timeout_s", "check_interval_s"):
            positive(f"resilience.supervisor.{key}", getattr(self, key))
        at_least("resilience.supervisor.safety_factor", self.safety_factor, 1.0)
        choice("resilience.supervisor.requeue", self.requeue, ("auto", "never"))


@dataclass
class SkipStepConfig:
    """OLMo-core's z-score skip step: drop the update of a step whose loss or grad norm is an outlier."""

    enabled: bool = False
    """Skip the optimizer update of an outlier step (counted as step_skipped in metrics)."""
    metrics: list[str] = field(default_factory=lambda: ["loss", "grad_norm"])
    """Which values are tested: loss (before the update) and/or grad_norm (Megatron's pre-clip norm, computed
    only when optimizer.clip_grad > 0)."""
    window: int = 128
    """Recent non-skipped steps whose mean and standard deviation the z-score uses."""
    sigma: float = 6.0
    """Skip when (value - mean) / std of the window exceeds this (upward outliers only)."""
    min_history: int = 20
    """Steps in the window before anything can be skipped (the first steps of a run move fast)."""
    max_consecutive: int = 5
    """More skips in a row than this is a burst the window cannot explain: stop (exit 87) for a person to look."""

    def __post_init__(self) -> None:
        for name in self.metrics:
            choice("resilience.skip_step.metrics[]", name, ("loss", "grad_norm"))
        if not self.metrics:
            raise ConfigError("resilience.skip_step.metrics: name at least one of loss, grad_norm")
        at_least("resilience.skip_step.window", self.window, 2)
        at_least("resilience.skip_step.sigma", self.sigma, 0.5)
        at_least("resilience.skip_step.min_history", self.min_history, 2)
        if self.min_history > self.window:
            raise ConfigError(f"resilience.skip_step.min_history={self.min_history}: must be <= window={self.window}")
        at_least("resilience.skip_step.max_consecutive", self.max_consecutive, 1)


@dataclass
class LayerNormsConfig:
    interval: int = 0
    """Every N steps, log per-layer gradient, parameter and update norms (norms/grad/layer03 ...); 0 = off."""
    update_norms: bool = True
    """Also the update norm |p_after - p_before| per layer (keeps one copy of the rank's parameters during the
    optimizer step of logged steps)."""

    def __post_init__(self) -> None:
        at_least("resilience.layer_norms.interval", self.interval, 0)


@dataclass
class AlertsConfig:
    """Webhook alerts (megatron_align.resilience.alerts). The URL comes only from the environment variable
    MEGATRON_ALIGN_ALERT_WEBHOOK (a secret: config.yaml is written to run_dir); unset = no alerts."""

    min_interval_s: float = 900.0
    """The same kind of alert (give_up, hang, stall ...) at most once per this many seconds."""
    max_per_hour: int = 20
    """At most this many alerts per hour from one process; the next one that goes out says how many were held back."""
    restarts_per_hour: int = 3
    """Alert when the supervisor has restarted the job this many times within the last hour."""
    stall_after_s: float = 900.0
    """Rank 0 alerts when no step has ended for this long (0 = off); the supervisor's hang verdict acts later."""
    timeout_s: float = 5.0
    """One POST's timeout; posts run on a background thread, so training never waits for them."""

    def __post_init__(self) -> None:
        at_least("resilience.alerts.min_interval_s", self.min_interval_s, 0.0)
        at_least("resilience.alerts.max_per_hour", self.max_per_hour, 1)
        at_least("resilience.alerts.restarts_per_hour", self.restarts_per_hour, 1)
        at_least("resilience.alerts.stall_after_s", self.stall_after_s, 0.0)
        at_least("resilience.alerts.timeout_s", self.timeout_s, 0.1)


@dataclass
class ResilienceConfig:
    enabled: bool = True
    """Master switch of the in-rank detectors (straggler, health, numerics, trajectory). `inject` applies regardless."""
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    """Per-section timing scores across ranks (see megatron_align.resilience.inrank.straggler)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Faulty-GPU checks: NVML, SDC GEMM, collectives, DP parameter hash (megatron_align.resilience.inrank.health)."""
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    """NaN/Inf and loss-spike handling (megatron_align.resilience.inrank.numerics)."""
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    """Power-law loss-curve monitor (megatron_align.resilience.inrank.numerics)."""
    skip_step: SkipStepConfig = field(default_factory=SkipStepConfig)
    """Z-score skip step on loss / grad norm outliers (megatron_align.resilience.inrank.skip_step)."""
    layer_norms: LayerNormsConfig = field(default_factory=LayerNormsConfig)
    """Per-layer gradient / parameter / update norms into metrics (megatron_align.resilience.inrank.layer_norms)."""
    inject: list[str] = field(default_factory=list)
    """Fault injection for drills/tests: "kind[:arg]@step[@rank]" items (megatron_align.resilience.protocol.faults);
    also read from the MEGATRON_ALIGN_FAULT environment variable."""
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    """`megatron-align launch`: restarts, retry budget, hang timeouts."""
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    """Webhook alerts from the supervisor and rank 0 (URL from $MEGATRON_ALIGN_ALERT_WEBHOOK only)."""
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    """Per-rank heartbeat files + SIGUSR2 stack dumps for the supervisor's hang watchdog (auto: on under `launch`)."""

    def __post_init__(self) -> None:
        parse_faults(list(self.inject), "resilience.inject")
