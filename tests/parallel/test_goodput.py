"""Goodput model: Young/Daly intervals, the exact expression, and a Monte Carlo run that confirms it."""

from __future__ import annotations

import math

import pytest

from megatron_align.cli import main
from megatron_align.errors import UserError
from megatron_align.parallel.goodput import (
    DEFAULT_MTBF_HOURS_PER_GPU,
    FailureModel,
    daly_interval,
    expected_goodput,
    optimal_interval,
    simulate_goodput,
    young_interval,
)


def test_default_failure_rate_is_the_llama3_figure():
    llama = FailureModel(num_gpus=16_384, save_s=60, restore_s=300, restart_s=600)
    assert llama.mtbf_hours_per_gpu == DEFAULT_MTBF_HOURS_PER_GPU
    # 419 interruptions in 54 days: one every 3.09 hours on the whole cluster.
    assert llama.cluster_mtbf_s / 3600 == pytest.approx(54 * 24 / 419)
    assert llama.recovery_s == 900


def test_intervals_and_optimum():
    model = FailureModel(num_gpus=16_384, save_s=60, restore_s=300, restart_s=600)
    exact = optimal_interval(model)
    young, daly = young_interval(model), daly_interval(model)
    assert young == pytest.approx(math.sqrt(2 * 60 * model.cluster_mtbf_s))
    assert abs(daly - exact) < abs(young - exact)  # the higher-order correction helps
    assert daly == pytest.approx(exact, rel=0.01)
    best = expected_goodput(model, exact)
    assert best > expected_goodput(model, 0.7 * exact) and best > expected_goodput(model, 1.4 * exact)
    # Restart cost scales goodput but does not move the optimum.
    slower = FailureModel(num_gpus=16_384, save_s=60, restore_s=3000, restart_s=3000)
    assert optimal_interval(slower) == pytest.approx(exact, rel=1e-4)
    assert expected_goodput(slower, exact) < best


def test_goodput_limits():
    # No failures in sight: only the save overhead remains.
    calm = FailureModel(num_gpus=1, save_s=10, restore_s=10, restart_s=10, mtbf_hours_per_gpu=1e9)
    assert expected_goodput(calm, 990) == pytest.approx(0.99, rel=1e-6)
    # First-order expansion when delta, tau, R << M.
    model = FailureModel(num_gpus=1024, save_s=30, restore_s=60, restart_s=120)
    tau, mtbf = 3600.0, model.cluster_mtbf_s
    first_order = 1 - 30 / tau - (tau / 2 + 180) / mtbf
    assert expected_goodput(model, tau) == pytest.approx(first_order, abs=2e-3)


@pytest.mark.parametrize("gpus, save, restore, restart, interval", [
    (16_384, 60, 300, 600, None),      # Llama-3 scale at the optimum
    (16_384, 30, 60, 120, 4 * 3600),   # far too rare checkpoints
    (65_536, 120, 600, 600, None),     # failures every 46 minutes
    (2_048, 300, 300, 300, 600),       # checkpoints almost as long as the interval
])
def test_monte_carlo_confirms_the_formula(gpus, save, restore, restart, interval):
    model = FailureModel(num_gpus=gpus, save_s=save, restore_s=restore, restart_s=restart)
    tau = interval or optimal_interval(model)
    sim = simulate_goodput(model, tau, trials=128, seed=7)
    assert sim.mean_failures > 50  # the run really went through failures
    assert sim.goodput == pytest.approx(expected_goodput(model, tau), rel=0.02)
    assert abs(sim.goodput - expected_goodput(model, tau)) < 5 * sim.stderr + 1e-3


def test_monte_carlo_is_seeded():
    model = FailureModel(num_gpus=16_384, save_s=60, restore_s=300, restart_s=600)
    a, b = (simulate_goodput(model, 1200, trials=32, seed=3) for _ in range(2))
    c = simulate_goodput(model, 1200, trials=32, seed=4)
    assert a == b and a.goodput != c.goodput


def test_bad_inputs_raise_user_errors():
    with pytest.raises(UserError, match="--gpus"):
        FailureModel(num_gpus=0, save_s=1, restore_s=1, restart_s=1)
    with pytest.raises(UserError, match="--save-s"):
        FailureModel(num_gpus=8, save_s=-1, restore_s=1, restart_s=1)
    with pytest.raises(UserError, match="interval"):
        expected_goodput(FailureModel(num_gpus=8, save_s=1, restore_s=1, restart_s=1), 0)


def test_cli_plan_goodput(capsys):
    argv = ["plan", "goodput", "--gpus", "16384", "--save-s", "60", "--restore-s", "300", "--restart-s", "600",
            "--interval-s", "1800", "--trials", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Young" in out and "Daly" in out and "exact optimum" in out and "Monte Carlo at 1800 s" in out
    assert "a failure every 3.09 h" in out
    assert main(["plan", "goodput", "--gpus", "8", "--save-s", "60"]) == 2
    assert "--restore-s" in capsys.readouterr().err
