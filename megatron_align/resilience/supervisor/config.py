"""Config of the restart manager (`megatron-align launch`) and of the rank heartbeats it watches.

Composed into :class:`megatron_align.resilience.config.ResilienceConfig` as
``resilience.supervisor`` and ``resilience.heartbeat``. The hang timeouts follow
nvidia-resiliency-ext's fault-tolerance launcher: a generous timeout until the
ranks have shown how long a step takes (start-up, checkpoint load, first
steps), then ``safety_factor`` x the longest step seen after ``warmup_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_align.errors import ConfigError


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"resilience.{key}={value}: must be >= {low}")


@dataclass
class HeartbeatConfig:
    """Per-rank heartbeat files (``<run_dir>/heartbeats/rank_<R>.json``) and stack dumps on SIGUSR2."""

    enabled: str = "auto"
    """auto (on when started by `megatron-align launch`) | true | false."""
    min_interval_s: float = 0.2
    """At most one heartbeat write per rank per this many seconds (a background thread flushes the newest)."""

    def __post_init__(self) -> None:
        if self.enabled not in ("auto", "true", "false"):
            raise ConfigError(f"resilience.heartbeat.enabled={self.enabled!r}: expected auto, true or false")
        _at_least("heartbeat.min_interval_s", self.min_interval_s, 0.0)


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
    """On SIGUSR1/SIGTERM inside a SLURM batch job submitted with --requeue: auto = `scontrol requeue` the job | never."""
    srun_args: list[str] = field(default_factory=list)
    """Extra `srun` arguments for the rank step inside a SLURM allocation (e.g. pyxis --container-image=...)."""
    rank_command: str = ""
    """How srun starts `megatron-align` on the nodes (e.g. ``megatron-align`` inside a container image);
    empty = this supervisor's Python interpreter with ``-m megatron_align.cli``."""
    tasks_per_node: int = 0
    """Ranks per node for `srun --ntasks-per-node`; 0 = SLURM_NTASKS_PER_NODE of the allocation, else unset."""

    def __post_init__(self) -> None:
        for key in ("max_restarts", "max_restarts_per_hour", "max_no_progress_restarts", "warmup_steps", "tasks_per_node"):
            _at_least(f"supervisor.{key}", getattr(self, key), 0)
        for key in ("backoff_s", "backoff_max_s", "stop_grace_s", "term_grace_s", "stack_dump_wait_s", "attribution_wait_s"):
            _at_least(f"supervisor.{key}", getattr(self, key), 0.0)
        for key in ("initial_timeout_s", "min_timeout_s", "between_steps_timeout_s", "check_interval_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"resilience.supervisor.{key}={getattr(self, key)}: must be > 0")
        _at_least("supervisor.safety_factor", self.safety_factor, 1.0)
        if self.requeue not in ("auto", "never"):
            raise ConfigError(f"resilience.supervisor.requeue={self.requeue!r}: expected auto or never")
