"""Detector arithmetic without ranks: straggler scores, power-law trajectory, SDC checksums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_align.config.resilience import StragglerConfig, TrajectoryConfig
from megatron_align.resilience.inrank.health import SdcGemm, bits_checksum, odd_ones_out
from megatron_align.resilience.inrank.numerics import TrajectoryMonitor, fit_power_law
from megatron_align.resilience.inrank.straggler import score_stragglers

NAN = math.nan
SECTIONS = ("forward_compute", "optimizer")


def test_relative_scores_compare_ranks_of_the_same_pipeline_stage():
    cfg = StragglerConfig()
    # 4 ranks, 2 pipeline stages; stage 1 does more work by design, rank 1 is a 3x slow GPU in stage 0.
    medians = [[0.10, 0.02], [0.30, 0.06], [0.20, 0.02], [0.21, NAN]]
    individual = [[1.0, 1.0], [0.33, 0.33], [1.0, 1.0], [0.98, NAN]]
    flags, summary = score_stragglers([0, 0, 1, 1], medians, individual, cfg, SECTIONS)
    assert {(f.rank, f.section, f.kind) for f in flags} == {
        (1, "forward_compute", "relative"), (1, "optimizer", "relative"),
        (1, "forward_compute", "individual"), (1, "optimizer", "individual")}
    assert all(f.blamed for f in flags)
    rel = next(f for f in flags if f.kind == "relative" and f.section == "forward_compute")
    assert rel.score == pytest.approx(1 / 3) and rel.reference_s == 0.10
    assert summary["min_relative"] == pytest.approx(1 / 3)


def test_a_slowdown_shared_by_all_peers_is_not_blamed_on_anyone():
    cfg = StragglerConfig()
    # Everyone's forward_backward got 2x slower (they all wait for someone): individual flags, nobody blamed.
    flags, summary = score_stragglers(
        [0, 0, 0], [[0.2], [0.2], [0.21]], [[0.5], [0.5], [0.48]], cfg, ("forward_backward",)
    )
    assert len(flags) == 3 and not any(f.blamed for f in flags)
    assert summary["min_relative"] == pytest.approx(0.2 / 0.21)
    # One rank alone got slower than it used to be, peers did not: blamed.
    flags, _ = score_stragglers([0, 0, 0], [[0.2], [0.2], [0.2]], [[1.0], [0.5], [0.95]], cfg, ("forward_compute",))
    assert [(f.rank, f.kind, f.blamed) for f in flags] == [(1, "individual", True)]
    # Without peers (one rank per stage) the individual score stands alone.
    flags, _ = score_stragglers([0], [[0.2]], [[0.4]], cfg, ("optimizer",))
    assert [(f.rank, f.blamed) for f in flags] == [(0, True)]


def test_sections_below_the_noise_floor_are_not_scored():
    cfg = StragglerConfig(min_section_seconds=0.002)
    flags, summary = score_stragglers([0, 0], [[0.0005], [0.0015]], [[1.0], [0.2]], cfg, ("data",))
    assert flags == [] and summary == {"min_relative": 1.0, "min_individual": 1.0}


def _curve(steps, a=8.0, b=0.35, c=1.8, noise=0.004, seed=0):
    rng = np.random.default_rng(seed)
    t = np.asarray(steps, dtype=float)
    return (a * t ** -b + c) * (1 + noise * rng.standard_normal(t.size))


def test_power_law_fit_recovers_the_curve():
    steps = np.arange(50, 3000, 25)
    law = fit_power_law(steps, _curve(steps, noise=0.0))
    assert (law.a, law.b, law.c) == pytest.approx((8.0, 0.35, 1.8), rel=2e-3)
    assert law.rel_residual < 1e-6
    noisy = fit_power_law(steps, _curve(steps, noise=0.01))
    assert float(noisy(5000)) == pytest.approx(8.0 * 5000 ** -0.35 + 1.8, rel=0.02)
    with pytest.raises(ValueError):
        fit_power_law([1, 2], [3.0, 2.0])


def _run_monitor(losses, cfg):
    monitor = TrajectoryMonitor(cfg)
    flagged = []
    for step, loss in enumerate(losses, start=1):
        if monitor.observe(step, float(loss)).get("trajectory/flagged"):
            flagged.append(step)
    return monitor, flagged


def test_trajectory_monitor_quiet_on_a_healthy_noisy_run():
    cfg = TrajectoryConfig(interval=20, warmup_steps=100)
    steps = np.arange(1, 2001)
    for seed in range(2):
        _, flagged = _run_monitor(_curve(steps, noise=0.03, seed=seed), cfg)
        assert flagged == [], seed
    # LR cooldown bends the curve *down*: not a deviation.
    losses = _curve(steps, noise=0.01)
    losses[1500:] *= np.linspace(1.0, 0.93, 500)
    assert _run_monitor(losses, cfg)[1] == []


def test_trajectory_monitor_flags_a_run_curving_off():
    cfg = TrajectoryConfig(interval=20, warmup_steps=100, band=0.03, patience=3)
    steps = np.arange(1, 2001)
    losses = _curve(steps, noise=0.01)
    # From step 1000 the loss stops improving and creeps up (a silent bug): 8% above the law by step 2000.
    bend = steps >= 1000
    losses[bend] = losses[999] * (1 + 0.0004 * (steps[bend] - 1000) ** 0.8)
    monitor, flagged = _run_monitor(losses, cfg)
    assert flagged, "sustained deviation not flagged"
    assert 1000 < flagged[0] <= 1600
    assert flagged == [s for s in range(flagged[0], 2001, 20)]  # stays flagged once it bends away
    # Deviating points never entered the fit.
    assert max(s for s, _ in monitor.points) < flagged[0]
    restored = TrajectoryMonitor(cfg)
    restored.load_state_dict(monitor.state_dict())
    assert restored.points == monitor.points and restored.smoothed() == monitor.smoothed()


def test_trajectory_monitor_restarts_its_fit_at_a_phase_change():
    cfg = TrajectoryConfig(interval=10, warmup_steps=20, min_points=3)
    monitor = TrajectoryMonitor(cfg)
    for step in range(1, 101):
        monitor.observe(step, 3.0 + 10 / step, phase="pretrain")
    assert monitor.points
    monitor.observe(101, 5.0, phase="midtrain")  # midtraining data: a new loss level
    assert monitor.points == [] and monitor.smoothed() == pytest.approx(5.0)


def test_sdc_checksum_sees_one_flipped_bit_and_is_deterministic():
    x = torch.randn(64, 64)
    y = x.clone()
    y.view(-1)[100:101].view(torch.int32).bitwise_xor_(1 << 3)  # a low mantissa bit: a tiny value change
    assert bits_checksum(x) != bits_checksum(y)
    assert bits_checksum(x.to(torch.bfloat16)) == bits_checksum(x.to(torch.bfloat16).clone())
    gemm_a, gemm_b = SdcGemm(64, seed=3, device=torch.device("cpu")), SdcGemm(64, seed=3, device=torch.device("cpu"))
    value, seconds = gemm_a.checksum()
    assert value == gemm_b.checksum()[0] and seconds >= 0
    assert gemm_a.checksum(perturb=True)[0] != value
    assert gemm_a.checksum()[0] == value  # the perturbation does not stick to the inputs


def test_odd_ones_out():
    assert odd_ones_out([5, 5, 5]) == ([], False)
    assert odd_ones_out([5, 7, 5, 5]) == ([1], False)
    assert odd_ones_out([5, 7]) == ([0, 1], True)
    assert odd_ones_out([1, 2, 3]) == ([0, 1, 2], True)
