"""megatron_align.resilience.inrank: the detectors that run inside every rank, as trainer callbacks.

Straggler scores (:mod:`.straggler`), faulty-GPU checks (:mod:`.health`), NaN/spike and
loss-trajectory monitors (:mod:`.numerics`), the heartbeat writer (:mod:`.heartbeat`) and the
collectives they share (:mod:`.ranks`). Nothing here talks to the supervisor except through
exit codes and files in the run dir (:mod:`megatron_align.resilience.protocol`).
"""

from __future__ import annotations

import os

from megatron_align.config import RootConfig
from megatron_align.resilience.alerts import WEBHOOK_ENV
from megatron_align.resilience.inrank.heartbeat import heartbeat_callbacks
from megatron_align.resilience.inrank.inject import InjectionCallback
from megatron_align.resilience.protocol.faults import FaultPlan, faults_from_env, parse_faults
from megatron_align.training.callbacks import Callback


def build_callbacks(config: RootConfig) -> list[Callback]:
    """Trainer callbacks for this area, from the root config (each class's ``priority`` sets when it runs)."""
    r = config.resilience
    plan = FaultPlan(parse_faults(list(r.inject)) + faults_from_env())
    callbacks: list[Callback] = [InjectionCallback(plan)] if plan.faults else []
    callbacks += heartbeat_callbacks(config)  # the supervisor's heartbeats: on under `launch`, whatever `enabled` says
    if r.alerts.stall_after_s and os.environ.get(WEBHOOK_ENV):
        from megatron_align.resilience.inrank.stall import StallAlert

        callbacks.append(StallAlert(r.alerts.stall_after_s))
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
    if r.layer_norms.interval:
        from megatron_align.resilience.inrank.layer_norms import LayerNorms

        callbacks.append(LayerNorms(r.layer_norms))
    if r.skip_step.enabled:
        from megatron_align.resilience.inrank.skip_step import SkipStep

        callbacks.append(SkipStep(r.skip_step))
    callbacks.append(NumericsMonitor(r.numerics))
    return callbacks
