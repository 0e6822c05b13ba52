"""Run plots from the run dir's own files: ``<run_dir>/plots/*.png``.

Everything is read back from what the run already wrote, so the plots can be redrawn at any
time (``write_plots(run_dir)``), also for a finished or crashed run:

- ``loss.png`` -- training loss, held-out loss per source (``heldout_loss/<source>``) and the
  learning rate over steps, from metrics.jsonl;
- ``mixture.png`` -- the data mixture: each source's share of the samples per step and its
  cumulative consumption, from ``samples/<source>`` keys (cumulative or per-step counts; phase
  changes from the ``phase`` key are marked);
- ``stragglers.png`` -- a rank x step (or time) heat map of straggler scores from
  ``<run_dir>/stragglers.jsonl`` (records with ``rank``, ``score`` and ``step`` or ``time``);
- ``eval.png`` -- propensity eval over training (``propensity/*`` keys, mean +- SEM over prompt
  variants and orders).

:func:`plot_report` draws one propensity report (``eval propensity --plot``, either mode) as bars,
mean +- SEM, overall and per group: per prompt template in log-prob mode, per system prompt in
generate mode (misalignment rate among parsed answers, parse rate, position bias).

A plot whose inputs are absent is skipped. matplotlib is optional (guarded); figures are drawn
with the object API (no pyplot state, no GUI backend) and written atomically.
"""

from __future__ import annotations

import os

import numpy as np

from megatron_align.fileio import atomic_open, read_jsonl
from megatron_align.optional import require

SAMPLES_PREFIX = "samples/"
EVAL_PREFIX = "propensity/"
HELDOUT_PREFIX = "heldout_loss/"


def _figure(rows: int = 1, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, height * rows), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*rows)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def loss_curves(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``loss`` and every ``heldout_loss/<source>`` found in the records: name -> (steps, values)."""
    names = ["loss"] + sorted({k for r in records for k in r if k.startswith(HELDOUT_PREFIX)})
    curves = {name: _series(records, name) for name in names}
    return {name: curve for name, curve in curves.items() if curve[0].size}


def plot_loss(records: list[dict], path: str) -> str | None:
    curves = loss_curves(records)
    if "loss" not in curves:
        return None
    fig, (ax,) = _figure()
    for i, (name, (steps, values)) in enumerate(curves.items()):
        if name == "loss":
            ax.plot(steps, values, color="C0", lw=1.2, label="train loss")
        else:  # held-out loss of one source: sparse points, so markers
            ax.plot(steps, values, color=f"C{i + 1}", lw=1.0, ls="--", marker="o", ms=3,
                    label=f"held-out {name[len(HELDOUT_PREFIX):]}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    top = ax
    lr_steps, lr = _series(records, "lr")
    if lr_steps.size:
        top = ax.twinx()
        top.plot(lr_steps, lr, color="gray", lw=1.0, alpha=0.7, label="learning rate")
        top.set_ylabel("learning rate", color="gray")
    if len(curves) > 1:  # on the top axes, so the learning-rate line never draws over it
        handles = [h for a in dict.fromkeys((ax, top)) for h in a.get_legend_handles_labels()[0]]
        top.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    ax.set_title("training and held-out loss" if len(curves) > 1 else "training loss")
    return _save(fig, path)


def _phase_changes(records: list[dict]) -> list[tuple[int, str]]:
    changes, previous = [], None
    for r in records:
        phase = r.get("phase")
        if phase is not None and phase != previous:
            changes.append((r.get("step", 0), str(phase)))
            previous = phase
    return changes


def plot_mixture(records: list[dict], path: str) -> str | None:
    names = sorted({k[len(SAMPLES_PREFIX):] for r in records for k in r if k.startswith(SAMPLES_PREFIX)})
    if not names:
        return None
    steps = np.asarray([r["step"] for r in records if "step" in r], dtype=np.float64)
    counts = np.asarray([[float(r.get(SAMPLES_PREFIX + n, 0.0) or 0.0) for n in names] for r in records if "step" in r])
    cumulative = bool(np.all(np.diff(counts, axis=0) >= 0)) and len(counts) > 1
    per_step = np.diff(counts, axis=0, prepend=np.zeros((1, len(names)))) if cumulative else counts
    totals = np.cumsum(per_step, axis=0) if not cumulative else counts
    shares = per_step / np.maximum(per_step.sum(axis=1, keepdims=True), 1e-12)
    fig, (ax_share, ax_total) = _figure(2, 3.0)
    ax_share.stackplot(steps, shares.T, labels=names, alpha=0.85)
    ax_share.set_ylabel("share of samples")
    ax_share.set_ylim(0, 1)
    ax_share.legend(loc="upper left", fontsize=8, ncol=min(4, len(names)))
    for i, name in enumerate(names):
        ax_total.plot(steps, totals[:, i], label=name, color=f"C{i}")
    ax_total.set_ylabel("samples consumed")
    ax_total.set_xlabel("step")
    ax_total.set_yscale("symlog")
    for step, phase in _phase_changes(records)[1:]:
        for ax in (ax_share, ax_total):
            ax.axvline(step, color="k", ls="--", lw=0.8)
        ax_share.text(step, 0.98, f" {phase}", va="top", fontsize=8)
    ax_share.set_title("data mixture: per-step composition and cumulative consumption")
    return _save(fig, path)


def plot_stragglers(records: list[dict], path: str) -> str | None:
    rows = [r for r in records if isinstance(r.get("rank"), int) and isinstance(r.get("score"), (int, float))]
    if not rows:
        return None
    if all(isinstance(r.get("step"), int) for r in rows):
        xs, xlabel = np.asarray([r["step"] for r in rows], dtype=np.float64), "step"
        num_bins = int(min(100, xs.max() - xs.min() + 1))  # one column per step while that is readable
        edges = np.linspace(xs.min() - 0.5, xs.max() + 0.5, num_bins + 1)
    else:
        t0 = min(float(r.get("time", 0.0)) for r in rows)
        xs, xlabel = np.asarray([(float(r.get("time", t0)) - t0) / 60 for r in rows]), "minutes since first record"
        num_bins = int(min(100, max(1, len(np.unique(xs)))))
        edges = np.linspace(xs.min(), xs.max() + 1e-9, num_bins + 1)
    num_ranks = max(r["rank"] for r in rows) + 1
    grid = np.full((num_ranks, num_bins), np.nan)
    for r, x in zip(rows, xs):
        col = min(int(np.searchsorted(edges, x, side="right")) - 1, num_bins - 1)
        grid[r["rank"], col] = np.nanmax([grid[r["rank"], col], float(r["score"])])
    fig, (ax,) = _figure(1, max(2.5, min(8.0, 0.25 * num_ranks + 1.5)))
    image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="magma_r",
                      extent=(edges[0], edges[-1], -0.5, num_ranks - 0.5))
    fig.colorbar(image, ax=ax, label="score (blank: not flagged)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rank")
    ax.set_title("stragglers: flagged ranks over time")
    return _save(fig, path)


def plot_eval(records: list[dict], path: str) -> str | None:
    metrics = [
        ("misalignment_rate", "misalignment rate"),
        ("p_misaligned", "P(misaligned)"),
        ("p_first", "P(first option)"),
    ]
    fig, (ax,) = _figure()
    drawn = False
    for i, (key, label) in enumerate(metrics):
        steps, values = _series(records, EVAL_PREFIX + key)
        if not steps.size:
            continue
        sem = dict(zip(*_series(records, EVAL_PREFIX + key + "_sem")))
        errors = np.asarray([sem.get(s, 0.0) for s in steps])
        ax.errorbar(steps, values, yerr=errors, marker="o", capsize=3, color=f"C{i}", label=label,
                    ls="--" if key == "p_first" else "-")
        drawn = True
    if not drawn:
        return None
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("alignment propensity over training (mean ± SEM over prompt variants x orders)")
    return _save(fig, path)


REPORT_BARS = {
    "logprob": (("misalignment_rate", "misalignment rate"), ("p_misaligned", "P(misaligned)"),
                ("p_first", "P(first option)")),
    "generate": (("misalignment_rate", "misalignment rate (parsed answers)"), ("parse_rate", "parse rate"),
                 ("first_rate", "answers 'A' (position bias)")),
}
"""Per report mode: the summary metrics :func:`plot_report` draws, with their legend labels."""


def report_bars(report: dict) -> tuple[list[str], dict[str, list[tuple[float | None, float | None]]]]:
    """What :func:`plot_report` draws: the group names (``overall`` first, then each system prompt in generate
    mode or each template in log-prob mode) and per metric label one (mean, sem) per group (None = no value)."""
    mode = "generate" if report.get("mode") == "generate" else "logprob"
    groups = {"overall": report["summary"], **report.get("system_prompts" if mode == "generate" else "by_variant", {})}
    bars = {label: [(g[key]["mean"], g[key]["sem"]) for g in groups.values()] for key, label in REPORT_BARS[mode]}
    return list(groups), bars


def plot_report(report: dict, path: str) -> str:
    """One propensity report as grouped bars (mean +- SEM over the group's conditions); returns ``path``."""
    require("matplotlib", "eval propensity --plot")
    names, bars = report_bars(report)
    fig, (ax,) = _figure(1, 4.0)
    width = 0.8 / len(bars)
    x = np.arange(len(names))
    for i, (label, values) in enumerate(bars.items()):
        means = [np.nan if m is None else m for m, _ in values]
        sems = [0.0 if s is None else s for _, s in values]
        offsets = x + (i - (len(bars) - 1) / 2) * width
        ax.bar(offsets, means, width, yerr=sems, capsize=3, color=f"C{i}", alpha=0.85, label=label,
               hatch="//" if i == len(bars) - 1 else None)
        for at, (mean, _) in zip(offsets, values):
            if mean is None:  # e.g. no parsed answer under this system prompt
                ax.text(at, 0.02, "n/a", ha="center", fontsize=7)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(bars))
    ax.grid(alpha=0.3, axis="y")
    mode = "generate" if report.get("mode") == "generate" else f"log-prob, {report.get('scoring', 'letter')} scoring"
    groups = "system prompt" if report.get("mode") == "generate" else "template"
    ax.set_title(f"propensity ({mode}): mean ± SEM over conditions, overall and per {groups}\n"
                 f"{report.get('model', '')}", fontsize=9)
    return _save(fig, path)


def write_plots(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Draw every plot whose inputs exist; returns the written paths."""
    require("matplotlib", "tracking.plots")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    records = list({r["step"]: r for r in records if "step" in r}.values())  # last record per step wins
    records.sort(key=lambda r: r["step"])
    written = [
        plot_loss(records, os.path.join(out_dir, "loss.png")),
        plot_mixture(records, os.path.join(out_dir, "mixture.png")),
        plot_stragglers(read_jsonl(os.path.join(run_dir, "stragglers.jsonl")), os.path.join(out_dir, "stragglers.png")),
        plot_eval(records, os.path.join(out_dir, "eval.png")),
    ]
    return [p for p in written if p]


__all__ = ["write_plots", "plot_loss", "plot_mixture", "plot_stragglers", "plot_eval", "plot_report", "report_bars"]
