"""What did alignment midtraining cost? lm-evaluation-harness tasks, side by side
(``megatron-align eval capability``).

Each model (a Hugging Face directory, or a megatron_align checkpoint converted on the fly into a
temporary HF directory with :func:`megatron_align.convert.to_hf.convert_to_hf`) runs the same
lm-evaluation-harness tasks in this process (``lm_eval.simple_evaluate``, ``--model hf``). The
first model is the baseline; the comparison has, per task, each model's score +- lm-eval's
stderr and its difference from the baseline, written as JSON, a text table and a PNG.

The paper's recipe on a real cluster (its seven benchmarks; needs the tasks' datasets cached or
hub access)::

    megatron-align eval capability --hf unfiltered=DIR --hf aligned=DIR \\
        --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,mmlu,gsm8k --out cost/

Local task files (``--include-path``, ``dataset_path: json``) run offline, as the tests do.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

from megatron_align.errors import UserError
from megatron_align.eval.report import write_report
from megatron_align.fileio import atomic_open, atomic_write_text

PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "mmlu", "gsm8k")
"""The seven-benchmark default recipe (docs/eval_and_tracking.md)."""
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "f1", "perplexity")
"""The headline metric of a task: the first of these its results have."""


@contextlib.contextmanager
def hf_model_dir(path: str, is_hf: bool, dtype: str = "auto") -> Iterator[str]:
    """``path`` itself for an HF directory; for a megatron_align checkpoint a temporary HF export."""
    if is_hf:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"--hf {path}: no config.json there; not a Hugging Face model directory")
        yield path
        return
    from megatron_align.convert.to_hf import convert_to_hf
    from megatron_align.training.checkpoint import resolve_checkpoint

    resolved = resolve_checkpoint(path) if os.path.isdir(path) else None
    if resolved is None:
        raise UserError(f"--checkpoint {path}: no complete megatron_align checkpoint there (a run's checkpoints/ "
                        "dir or one iter_* dir); for a Hugging Face directory use --hf")
    with tempfile.TemporaryDirectory(prefix="megatron_align_hf_") as tmp:
        convert_to_hf(resolved, os.path.join(tmp, "hf"), dtype=dtype, progress=False)
        yield os.path.join(tmp, "hf")


def lm_eval_scores(path: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                   batch_size: int = 8, device: str | None = None, num_fewshot: int | None = None,
                   log_samples: bool = False) -> dict:
    """Run lm-evaluation-harness (``hf`` model, this process) on an HF dir; returns its results dict."""
    from megatron_align.optional import require

    require("lm_eval", "eval capability / lm-eval parity (pip install -e '.[eval]')")
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return simple_evaluate(
            model="hf",
            model_args=f"pretrained={path},dtype=float32" if device == "cpu" else f"pretrained={path}",
            tasks=tasks,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            log_samples=log_samples,
            task_manager=TaskManager(include_path=include_path),
            bootstrap_iters=0 if limit else 1000,
        )
    except (KeyError, ValueError) as err:
        raise UserError(
            f"lm-eval on {path} with tasks {tasks}: {err} (task names must exist in lm-eval or in "
            f"--include-path {include_path})"
        ) from None


def task_scores(results: dict) -> dict[str, dict]:
    """``task -> {metric, score, stderr}`` for each task's primary metric (see PRIMARY_METRICS)."""
    out = {}
    for task, values in results["results"].items():
        for metric in PRIMARY_METRICS:
            key = next((k for k in values if k.split(",")[0] == metric), None)
            if key is not None:
                stderr = values.get(key.replace(metric, f"{metric}_stderr", 1))
                out[task] = {"metric": metric, "score": float(values[key]),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
                break
    return out


def compare(scores: dict[str, dict[str, dict]]) -> dict:
    """``model -> task scores`` -> the comparison (first model = baseline; differences per task)."""
    names = list(scores)
    tasks = sorted({t for s in scores.values() for t in s})
    rows = []
    for task in tasks:
        base = scores[names[0]].get(task)
        row = {"task": task, "metric": base["metric"] if base else None, "models": {}}
        for name in names:
            entry = scores[name].get(task)
            if entry is None:
                continue
            diff = entry["score"] - base["score"] if base and name != names[0] else None
            row["models"][name] = {**entry, "difference_from_baseline": diff}
        rows.append(row)
    return {"format": "megatron_align.capability", "version": 1, "baseline": names[0], "models": names, "tasks": rows}


def format_table(comparison: dict) -> str:
    names = comparison["models"]
    lines = [f"{'task':<24} {'metric':<9} " + " ".join(f"{n:>22}" for n in names)]
    for row in comparison["tasks"]:
        cells = []
        for n in names:
            e = row["models"].get(n)
            if e is None:
                cells.append(f"{'-':>22}")
                continue
            text = f"{e['score']:.3f}" + (f"±{e['stderr']:.3f}" if e["stderr"] is not None else "")
            if e["difference_from_baseline"] is not None:
                text += f" ({e['difference_from_baseline']:+.3f})"
            cells.append(f"{text:>22}")
        lines.append(f"{row['task']:<24} {row['metric'] or '-':<9} " + " ".join(cells))
    lines.append(f"(differences are against the baseline, {comparison['baseline']})")
    return "\n".join(lines)


def plot(comparison: dict, path: str) -> None:
    from megatron_align.optional import require

    require("matplotlib", "the capability plot")
    from matplotlib.figure import Figure

    names, rows = comparison["models"], comparison["tasks"]
    fig = Figure(figsize=(max(5, 1.4 * len(rows) * len(names)), 4))
    ax = fig.subplots()
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + k * width for i in range(len(rows))]
        ys = [r["models"].get(name, {}).get("score", 0.0) for r in rows]
        errs = [r["models"].get(name, {}).get("stderr") or 0.0 for r in rows]
        ax.bar(xs, ys, width, yerr=errs, capsize=4, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['task']}\n({r['metric']})" for r in rows], fontsize=8)
    ax.set_ylabel("score ± stderr")
    ax.legend()
    fig.suptitle("Capability cost: lm-evaluation-harness scores by model")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def compare_models(models: list[tuple[str, str, bool]], tasks: list[str], out_dir: str, *,
                   include_path: str | None = None, limit: int | None = None, batch_size: int = 8,
                   device: str | None = None, num_fewshot: int | None = None, on_model=None) -> dict:
    """Run ``tasks`` on each ``(label, path, is_hf)`` model (the first is the baseline), compare, and write
    capability.json, capability.txt and capability.png to ``out_dir``. ``on_model(label, scores)`` hears each
    model's scores as they finish. Returns the comparison."""
    if not tasks:
        raise UserError("--tasks: empty")
    scores, raw = {}, {}
    for label, path, is_hf in models:
        with hf_model_dir(path, is_hf) as hf_dir:
            results = lm_eval_scores(hf_dir, tasks, include_path, limit, batch_size, device, num_fewshot)
        raw[label] = results["results"]
        scores[label] = task_scores(results)
        if on_model is not None:
            on_model(label, scores[label])
    comparison = compare(scores)
    comparison["paths"] = {label: path for label, path, _ in models}
    comparison["lm_eval_results"] = raw
    os.makedirs(out_dir, exist_ok=True)
    write_report(json.loads(json.dumps(comparison, default=str)), os.path.join(out_dir, "capability.json"))
    atomic_write_text(os.path.join(out_dir, "capability.txt"), format_table(comparison) + "\n")
    plot(comparison, os.path.join(out_dir, "capability.png"))
    return comparison
