"""megatron_align.resilience.inrank: the detectors that run inside every rank, as trainer callbacks.

Straggler scores (:mod:`.straggler`), faulty-GPU checks (:mod:`.health`), NaN/spike and
loss-trajectory monitors (:mod:`.numerics`), the heartbeat writer (:mod:`.heartbeat`) and the
collectives they share (:mod:`.ranks`). Nothing here talks to the supervisor except through
exit codes and files in the run dir (:mod:`megatron_align.resilience.exit_codes`).
"""

from __future__ import annotations

from megatron_align.config.schema import RootConfig
from megatron_align.resilience.faults import FaultPlan, faults_from_env, parse_faults
from megatron_align.resilience.inrank.heartbeat import heartbeat_callbacks
from megatron_align.resilience.inrank.inject import InjectionCallback
from megatron_align.training.callbacks import Callback


def build_callbacks(config: RootConfig) -> list[Callback]:
    """Trainer callbacks for this area, from the root config.

    Order matters where hooks share a moment: injection first (its forward hooks wrap the
    model before the straggler clock's), numerics last in ``on_step_end`` (it may end the
    process after writing the step's record).
    """
    r = config.resilience
    plan = FaultPlan(parse_faults(list(r.inject)) + faults_from_env())
    callbacks: list[Callback] = [InjectionCallback(plan)] if plan.faults else []
    callbacks += heartbeat_callbacks(config)  # the supervisor's heartbeats: on under `launch`, whatever `enabled` says
    if not r.enabled:
        return callbacks
    from megatron_align.resilience.inrank.health import HealthMonitor
    from megatron_align.resilience.inrank.numerics import NumericsMonitor, TrajectoryMonitor
    from megatron_align.resilience.inrank.straggler import StragglerDetector

    if r.straggler.interval:
        callbacks.append(StragglerDetector(r.straggler))
    if r.health.nvml_interval or r.health.sdc_interval or r.health.collective_interval or r.health.param_hash_interval:
        callbacks.append(HealthMonitor(r.health, plan))
    if r.trajectory.interval:
        callbacks.append(TrajectoryMonitor(r.trajectory))
    callbacks.append(NumericsMonitor(r.numerics))
    return callbacks
