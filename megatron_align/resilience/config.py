"""Config for megatron_align.resilience (composed into the root config as ``resilience:``).

In-rank detectors (this file's sub-configs) run as trainer callbacks; the supervisor that
wraps the job from outside has its own section. Cheap detectors are on by default (straggler
timing, NaN/spike checks, loss trajectory, NVML when pynvml and a GPU are present, a tiny
collective check); the ones that cost a GEMM or a pass over the weights (SDC, parameter hash)
are off until given an interval. An interval of 0 turns a check off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_align.errors import ConfigError
from megatron_align.resilience.faults import parse_faults
from megatron_align.resilience.supervisor.config import HeartbeatConfig, SupervisorConfig

_POLICIES = ("log", "exclude_on_restart", "stop")
STRAGGLER_SECTIONS = ("data", "forward_backward", "forward_compute", "optimizer", "checkpoint")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")


def _at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value}: must be >= {minimum}")


def _fraction(key: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{key}={value}: must be in (0, 1]")


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
            _at_least(f"resilience.straggler.{key}", getattr(self, key), 0)
        for key in ("history", "patience"):
            _at_least(f"resilience.straggler.{key}", getattr(self, key), 1)
        _fraction("resilience.straggler.relative_threshold", self.relative_threshold)
        _fraction("resilience.straggler.individual_threshold", self.individual_threshold)
        _at_least("resilience.straggler.min_section_seconds", self.min_section_seconds, 0.0)
        _choice("resilience.straggler.policy", self.policy, _POLICIES)
        _choice("resilience.straggler.clock", self.clock, ("auto", "cuda", "cpu", "wall"))
        for i, section in enumerate(self.sections):
            _choice(f"resilience.straggler.sections[{i}]", section, STRAGGLER_SECTIONS)


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
        _choice("resilience.health.policy", self.policy, _POLICIES)
        for key in ("nvml_interval", "sdc_interval", "collective_interval", "param_hash_interval"):
            _at_least(f"resilience.health.{key}", getattr(self, key), 0)
        _at_least("resilience.health.sdc_size", self.sdc_size, 16)
        _fraction("resilience.health.min_clock_ratio", self.min_clock_ratio)


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
        _choice("resilience.numerics.nan_policy", self.nan_policy, ("skip", "stop", "log"))
        _choice("resilience.numerics.spike_policy", self.spike_policy, ("skip", "stop", "log"))
        _at_least("resilience.numerics.max_consecutive_skips", self.max_consecutive_skips, 1)
        _at_least("resilience.numerics.spike_factor", self.spike_factor, 0.0)
        if 0 < self.spike_factor <= 1:
            raise ConfigError(f"resilience.numerics.spike_factor={self.spike_factor}: must be > 1 (or 0 = off)")
        _at_least("resilience.numerics.spike_window", self.spike_window, 1)


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
        _at_least("resilience.trajectory.interval", self.interval, 0)
        _at_least("resilience.trajectory.warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"resilience.trajectory.smoothing={self.smoothing}: must be in [0, 1)")
        _at_least("resilience.trajectory.band", self.band, 0.0)
        _at_least("resilience.trajectory.patience", self.patience, 1)
        _at_least("resilience.trajectory.min_points", self.min_points, 3)
        _choice("resilience.trajectory.policy", self.policy, ("log", "stop"))


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
    inject: list[str] = field(default_factory=list)
    """Fault injection for drills/tests: "kind[:arg]@step[@rank]" items (megatron_align.resilience.faults);
    also read from the MEGATRON_ALIGN_FAULT environment variable."""
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    """`megatron-align launch`: restarts, retry budget, hang timeouts (megatron_align.resilience.supervisor.config)."""
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    """Per-rank heartbeat files + SIGUSR2 stack dumps for the supervisor's hang watchdog (auto: on under `launch`)."""

    def __post_init__(self) -> None:
        parse_faults(list(self.inject), "resilience.inject")
