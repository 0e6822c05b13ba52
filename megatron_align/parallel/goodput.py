"""How often to checkpoint, and how much of the wall clock a large job keeps: Young/Daly + Monte Carlo.

What: given the cluster size N, a per-GPU failure rate, the checkpoint save time delta, the
restore time and the restart overhead (R = restore + restart), compute the checkpoint interval
tau (compute time between two saves) that maximises goodput = productive time / wall time, and
that goodput; a seeded, numpy-vectorised Monte Carlo run of the same job confirms the formula.

Why: failures arrive N times faster on N GPUs. Llama 3 405B saw 419 unexpected interruptions
in 54 days on 16,384 H100s: a per-GPU MTBF of 54*24*16384/419 = 50,676 h (5.8 years), but a
cluster MTBF M = 50,676/16,384 = 3.1 hours. Checkpoint too rarely and each failure throws away
hours; too often and the saves themselves eat the run.

The one idea: with exponential (memoryless) failures at rate 1/M, a piece of work that needs w
uninterrupted seconds, restarted from its beginning after every failure, and whose every retry
first pays R (during which failures can also strike), takes in expectation
    E[T(w)] = M * exp(R/M) * (exp(w/M) - 1)
(first attempt: E[min(X, w)] = M(1 - e^{-w/M}); it fails with probability 1 - e^{-w/M}, and then
every retry needs R + w uninterrupted, which takes M(e^{(R+w)/M} - 1); the sum simplifies to the
above). A job of W productive seconds is W/tau such pieces with w = tau + delta (compute, then
save), so (Daly 2006, eq. for T_w)
    goodput(tau) = tau / (M * exp(R/M) * (exp((tau + delta)/M) - 1)).
R only scales the denominator, so the best tau does not depend on it. Expanding for delta << M:
    Young (1974):  tau_opt ~= sqrt(2 * delta * M)
    Daly (2006):   tau_opt ~= sqrt(2*delta*M) * (1 + sqrt(delta/(2M))/3 + (delta/(2M))/9) - delta
                   (for delta < 2M; otherwise tau_opt = M)
and to first order goodput ~= 1 - delta/tau - (tau/2 + R)/M: half an interval is lost per
failure on average, plus the restart. ``optimal_interval`` also maximises the exact expression
numerically (golden-section search), which is what the CLI reports as "exact".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_align.errors import UserError

# Llama 3 405B pretraining (Dubey et al. 2024, "The Llama 3 Herd of Models", section 3.3.4).
LLAMA3_INTERRUPTIONS = 419
LLAMA3_DAYS = 54
LLAMA3_GPUS = 16_384
DEFAULT_MTBF_HOURS_PER_GPU = LLAMA3_DAYS * 24 * LLAMA3_GPUS / LLAMA3_INTERRUPTIONS


@dataclass(frozen=True)
class FailureModel:
    """A cluster with exponential failures and a checkpoint/restart cost model (all times in seconds)."""

    num_gpus: int
    save_s: float
    """delta: wall time one checkpoint save blocks training."""
    restore_s: float
    """Time to load the newest checkpoint after a restart."""
    restart_s: float
    """Time to tear down, reschedule and re-initialise the job (before the restore)."""
    mtbf_hours_per_gpu: float = DEFAULT_MTBF_HOURS_PER_GPU
    """Mean time between failures of one GPU (default: the Llama 3 405B rate)."""

    def __post_init__(self) -> None:
        if self.num_gpus <= 0:
            raise UserError(f"--gpus={self.num_gpus}: must be > 0")
        if self.mtbf_hours_per_gpu <= 0:
            raise UserError(f"--mtbf-hours-per-gpu={self.mtbf_hours_per_gpu}: must be > 0")
        for name in ("save_s", "restore_s", "restart_s"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_s', '-s')}={getattr(self, name)}: must be >= 0")

    @property
    def cluster_mtbf_s(self) -> float:
        """M: mean time between failures anywhere in the job."""
        return self.mtbf_hours_per_gpu * 3600.0 / self.num_gpus

    @property
    def recovery_s(self) -> float:
        """R: restart overhead plus checkpoint restore."""
        return self.restart_s + self.restore_s


def expected_goodput(model: FailureModel, interval_s: float) -> float:
    """tau / (M e^{R/M} (e^{(tau+delta)/M} - 1)): productive fraction of wall time at interval tau."""
    if interval_s <= 0:
        raise UserError(f"checkpoint interval {interval_s} s: must be > 0")
    mtbf = model.cluster_mtbf_s
    # expm1 keeps precision when (tau + delta) << M (small clusters: goodput close to 1).
    return interval_s / (mtbf * math.exp(model.recovery_s / mtbf) * math.expm1((interval_s + model.save_s) / mtbf))


def young_interval(model: FailureModel) -> float:
    return math.sqrt(2.0 * model.save_s * model.cluster_mtbf_s)


def daly_interval(model: FailureModel) -> float:
    delta, mtbf = model.save_s, model.cluster_mtbf_s
    if delta >= 2.0 * mtbf:
        return mtbf
    x = delta / (2.0 * mtbf)
    return math.sqrt(2.0 * delta * mtbf) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - delta


def optimal_interval(model: FailureModel) -> float:
    """Maximise the exact goodput over tau by golden-section search on log(tau)."""
    if model.save_s == 0:
        raise UserError("--save-s=0: with free checkpoints the best interval is 0 (checkpoint every step)")
    lo, hi = math.log(model.save_s * 1e-3), math.log(max(10.0 * model.cluster_mtbf_s, model.save_s * 10))
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = expected_goodput(model, math.exp(a)), expected_goodput(model, math.exp(b))
    for _ in range(200):  # the goodput is unimodal in tau
        if fa < fb:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = expected_goodput(model, math.exp(b))
        else:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = expected_goodput(model, math.exp(a))
        if hi - lo < 1e-9:
            break
    return math.exp((lo + hi) / 2)


@dataclass(frozen=True)
class SimulationResult:
    goodput: float
    """Productive time / mean wall time over all trials."""
    stderr: float
    """Standard error of the goodput estimate (delta method over trials)."""
    mean_failures: float
    trials: int
    work_s: float


def simulate_goodput(model: FailureModel, interval_s: float, work_s: float | None = None,
                     trials: int = 256, seed: int = 0, expected_failures: float = 200.0) -> SimulationResult:
    """Run ``trials`` independent jobs of ``work_s`` productive seconds through random failures.

    The timeline of each job: compute tau, save delta (the checkpoint commits at the end of the
    save), repeat; a failure at any moment -- computing, saving, or recovering -- loses everything
    since the last committed checkpoint and starts a recovery of R seconds. Failures form a Poisson
    process, so drawing a fresh exponential gap at every (re)start is exact. The loop advances all
    trials together from one failure to the next; it runs about (job wall time / M) iterations.
    Default ``work_s``: long enough for ``expected_failures`` failures per trial.
    """
    if interval_s <= 0 or trials <= 0:
        raise UserError("interval and trials must be > 0")
    mtbf, delta, recovery = model.cluster_mtbf_s, model.save_s, model.recovery_s
    cycle = interval_s + delta
    if work_s is None:
        work_s = max(expected_failures * mtbf, 10 * interval_s)
    segments = max(1, round(work_s / interval_s))  # whole checkpoint intervals
    rng = np.random.default_rng(seed)
    wall = np.zeros(trials)
    committed = np.zeros(trials, dtype=np.int64)  # checkpoint intervals safely saved
    recovering = np.zeros(trials, dtype=bool)  # the first attempt starts without a restart
    failures = np.zeros(trials, dtype=np.int64)
    active = np.ones(trials, dtype=bool)
    # Each iteration consumes one failure of every still-running trial; budget 5x the expected count.
    expected = segments * interval_s / expected_goodput(model, interval_s) / mtbf
    if expected > 1e6:
        raise UserError(f"simulating {expected:.3g} failures per job is too slow: the goodput here is about "
                        f"{expected_goodput(model, interval_s):.2e}; shorten the interval or the recovery")
    max_iterations = int(5 * expected + 100)
    for _ in range(max_iterations):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        gap = rng.exponential(mtbf, size=idx.size)
        lead = np.where(recovering[idx], recovery, 0.0)
        finish = lead + (segments - committed[idx]) * cycle
        done = gap >= finish
        # Jobs that finish before the next failure.
        wall[idx[done]] += finish[done]
        active[idx[done]] = False
        # Jobs hit by a failure: keep the intervals whose save completed before it.
        hit = idx[~done]
        gap_hit, lead_hit = gap[~done], lead[~done]
        saved = np.floor(np.maximum(gap_hit - lead_hit, 0.0) / cycle).astype(np.int64)
        committed[hit] += saved
        wall[hit] += gap_hit
        recovering[hit] = True
        failures[hit] += 1
    else:
        raise RuntimeError("Monte Carlo did not converge; the recovery time is far beyond the MTBF")
    productive = segments * interval_s
    mean_wall = float(wall.mean())
    stderr = productive * float(wall.std(ddof=1)) / math.sqrt(trials) / mean_wall**2 if trials > 1 else float("nan")
    return SimulationResult(productive / mean_wall, stderr, float(failures.mean()), trials, float(productive))


@dataclass(frozen=True)
class GoodputReport:
    cluster_mtbf_s: float
    young_s: float
    daly_s: float
    exact_s: float
    chosen_s: float
    goodput_young: float
    goodput_daly: float
    goodput_exact: float
    goodput_chosen: float
    simulated: SimulationResult


def goodput_report(model: FailureModel, interval_s: float | None = None, trials: int = 256,
                   seed: int = 0) -> GoodputReport:
    """Formulas at Young's, Daly's and the exact optimum (and ``interval_s`` if given),
    plus a simulation of the chosen one."""
    young, daly, exact = young_interval(model), daly_interval(model), optimal_interval(model)
    chosen = interval_s if interval_s is not None else exact
    return GoodputReport(
        cluster_mtbf_s=model.cluster_mtbf_s, young_s=young, daly_s=daly, exact_s=exact, chosen_s=chosen,
        goodput_young=expected_goodput(model, young), goodput_daly=expected_goodput(model, daly),
        goodput_exact=expected_goodput(model, exact), goodput_chosen=expected_goodput(model, chosen),
        simulated=simulate_goodput(model, chosen, trials=trials, seed=seed))
