"""megatron_align.resilience: detectors inside the ranks, fault injection, and the supervisor outside them.

In-rank callbacks (built here from ``config.resilience``): fault injection
(:mod:`.inject`), straggler scores (:mod:`.straggler`), faulty-GPU checks (:mod:`.health`),
NaN/spike and loss-trajectory monitors (:mod:`.numerics`). They talk to the supervisor only
through exit codes and files in the run dir (:mod:`.exit_codes`).
"""

from __future__ import annotations


def build_callbacks(config) -> list:
    """Trainer callbacks for this area, from the root config.

    Order matters where hooks share a moment: injection first (its forward hooks wrap the
    model before the straggler clock's), numerics last in ``on_step_end`` (it may end the
    process after writing the step's record).
    """
    from megatron_align.resilience.inrank.heartbeat import heartbeat_callbacks
    from megatron_align.resilience.faults import FaultPlan, InjectionCallback, faults_from_env, parse_faults

    r = config.resilience
    plan = FaultPlan(parse_faults(list(r.inject)) + faults_from_env())
    callbacks: list = [InjectionCallback(plan)] if plan.faults else []
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
