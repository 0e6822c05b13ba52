"""Callbacks run in one explicit order, by ``priority`` then ``name``, whatever order the areas built them in."""

from __future__ import annotations

from megatron_align.training.callbacks import Callback, CallbackList


def _callback(name: str, priority: int, calls: list[str]) -> Callback:
    cls = type(name, (Callback,), {"name": name, "priority": priority,
                                   "on_step_start": lambda self, trainer, step: calls.append(self.name)})
    return cls()


def test_hooks_run_by_priority_then_name():
    calls: list[str] = []
    built = [_callback("tracking", 100, calls), _callback("zeta", 0, calls), _callback("alpha", 0, calls),
             _callback("fault_injection", -100, calls)]
    CallbackList(built).on_step_start(None, 1)
    assert calls == ["fault_injection", "alpha", "zeta", "tracking"]
    calls.clear()
    CallbackList(list(reversed(built))).on_step_start(None, 1)  # another build order: the same run order
    assert calls == ["fault_injection", "alpha", "zeta", "tracking"]


def test_the_areas_callbacks_keep_their_documented_order():
    from megatron_align.eval.callback import PropensityCallback
    from megatron_align.resilience.inrank.health import HealthMonitor
    from megatron_align.resilience.inrank.heartbeat import HeartbeatCallback
    from megatron_align.resilience.inrank.inject import InjectionCallback
    from megatron_align.resilience.inrank.layer_norms import LayerNorms
    from megatron_align.resilience.inrank.numerics import NumericsMonitor, TrajectoryMonitor
    from megatron_align.resilience.inrank.skip_step import SkipStep
    from megatron_align.resilience.inrank.stall import StallAlert
    from megatron_align.resilience.inrank.straggler import StragglerDetector
    from megatron_align.tracking.callback import TrackingCallback
    from megatron_align.training.heldout import HeldoutLossCallback
    from megatron_align.training.profiling import ProfilerCallback

    order = [ProfilerCallback, InjectionCallback, HeartbeatCallback, StallAlert, StragglerDetector, HealthMonitor,
             TrajectoryMonitor, LayerNorms, SkipStep, NumericsMonitor, HeldoutLossCallback, PropensityCallback,
             TrackingCallback]
    assert sorted(order, key=lambda cls: (cls.priority, cls.name)) == order
