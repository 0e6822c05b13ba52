"""`megatron-align demo`: the paper's experiment in miniature, on CPU, no downloads.

Three conditions, several seeds, one tiny Llama-style model each:

- **unfiltered**: pretrain + midtrain on ``web`` (general text + the web's mostly-misaligned AI discourse);
- **filtered**: the same on ``web_filtered`` (two-stage blocklist, flagged documents resampled);
- **aligned**: the unfiltered pretraining checkpoint, then midtraining with synthetic aligned-AI
  documents upsampled into the mix (the paper: ~1% of midtraining tokens; here a larger share,
  ``--aligned-share``, because the run is ~10^5 times shorter).

Unfiltered and aligned share their pretraining phase exactly (one run, resumed twice), as in the
paper's design. Each final checkpoint is scored with the propensity eval on held-out scenarios
(never in any training document): both option orders x all template variants. The table reports
misalignment rate and mean P(misaligned) per condition, mean ± SEM over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import yaml

from megatron_align.errors import UserError

CONDITIONS = ("unfiltered", "filtered", "aligned")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (data, runs, table, plot)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per condition")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (pretrain 80%%, midtrain 20%%)")
    parser.add_argument("--aligned-share", type=float, default=0.2, help="aligned-document weight in midtraining")
    parser.add_argument("--documents", type=int, default=6000, help="general-text documents")
    parser.add_argument("--world-size", type=int, default=2, help="CPU ranks per training run")
    parser.add_argument("--tracking", choices=("mlflow", "jsonl", "none"), default="mlflow")
    parser.add_argument("--quick", action="store_true", help="CI size: 1 seed, 16 steps, small corpus")


def _train_config(args, data_dir: str, run_dir: str, seed: int, midtrain: dict, pretrain: dict) -> dict:
    pretrain_steps = int(args.steps * 0.8)
    return {
        "run_dir": run_dir,
        "model": {"num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 352, "num_attention_heads": 4,
                  "num_query_groups": 2, "seq_length": 256, "tie_embeddings": True},
        "parallel": {"world_size": args.world_size},
        "train": {"steps": args.steps, "global_batch_size": 16, "micro_batch_size": 8 // args.world_size or 1,
                  "seed": seed},
        "optimizer": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": max(1, args.steps // 20), "decay_style": "WSD",
                      "wsd_decay_steps": args.steps - pretrain_steps, "weight_decay": 0.01},
        "data": {"sources": [{"name": n, "prefix": os.path.join(data_dir, n)} for n in ("web", "web_filtered", "aligned")],
                 "mixture": {"seed": seed, "block_size": 50, "default_max_repetitions": 50.0,
                             "phases": [{"name": "pretrain", "samples": pretrain_steps * 16, "weights": pretrain},
                                        {"name": "midtrain", "fraction": 1.0 - pretrain_steps / args.steps, "weights": midtrain}]}},
        "checkpoint": {"interval": 0, "keep_last": 1, "keep_every": pretrain_steps},
        "tracking": {"backend": args.tracking},
        "logging": {"interval": max(1, args.steps // 10)},
    }


def _train(config: dict, log_path: str, *overrides: str) -> None:
    os.makedirs(config["run_dir"], exist_ok=True)
    path = os.path.join(config["run_dir"], "demo_config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    with open(log_path, "a") as log:
        code = subprocess.call([sys.executable, "-m", "megatron_align.cli", "train", path, *overrides],
                               stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise UserError(f"demo training run {config['run_dir']} failed with exit code {code}; see {log_path}")


def run_condition_runs(args, data_dir: str, runs_dir: str, seed: int, log_path: str) -> dict[str, str]:
    """Train the three conditions for one seed; returns condition -> final checkpoint dir."""
    pretrain_steps = int(args.steps * 0.8)
    web, filt = {"web": 1.0}, {"web_filtered": 1.0}
    aligned_mid = {"web": 1.0 - args.aligned_share, "aligned": args.aligned_share}
    unf = _train_config(args, data_dir, os.path.join(runs_dir, f"unfiltered_s{seed}"), seed, web, web)
    _train(unf, log_path, f"train.stop_at_step={pretrain_steps}")
    pretrained = os.path.join(unf["run_dir"], "checkpoints", f"iter_{pretrain_steps:07d}")
    ali = _train_config(args, data_dir, os.path.join(runs_dir, f"aligned_s{seed}"), seed, aligned_mid, web)
    _train(ali, log_path, f"checkpoint.load={pretrained}", "data.mixture.allow_fingerprint_change=true")
    _train(unf, log_path)  # the unfiltered run continues its own midtraining
    fil = _train_config(args, data_dir, os.path.join(runs_dir, f"filtered_s{seed}"), seed, filt, filt)
    _train(fil, log_path)
    return {name: os.path.join(cfg["run_dir"], "checkpoints") for name, cfg in
            (("unfiltered", unf), ("filtered", fil), ("aligned", ali))}


def summarize(results: dict[str, list[dict]]) -> dict:
    table = {}
    for condition, reports in results.items():
        rates = [r["summary"]["misalignment_rate"]["mean"] for r in reports]
        probs = [r["summary"]["p_misaligned"]["mean"] for r in reports]
        sem = lambda v: float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
        table[condition] = {"misalignment_rate": float(np.mean(rates)), "misalignment_rate_sem": sem(rates),
                            "p_misaligned": float(np.mean(probs)), "p_misaligned_sem": sem(probs),
                            "per_seed_misalignment_rate": rates, "per_seed_p_misaligned": probs}
    unf, ali = table.get("unfiltered"), table.get("aligned")
    if unf and ali:
        diffs = np.subtract(ali["per_seed_p_misaligned"], unf["per_seed_p_misaligned"])
        table["aligned_minus_unfiltered_p_misaligned"] = {"per_seed": diffs.tolist(), "mean": float(diffs.mean()),
                                                          "all_seeds_lower": bool((diffs < 0).all())}
    return table


def format_table(table: dict) -> str:
    lines = [f"{'condition':<12} {'misalignment rate':>20} {'P(misaligned)':>18}   per-seed P(misaligned)"]
    for c in CONDITIONS:
        if c in table:
            row = table[c]
            seeds = " ".join(f"{p:.3f}" for p in row["per_seed_p_misaligned"])
            lines.append(f"{c:<12} {row['misalignment_rate']:>12.3f} ± {row['misalignment_rate_sem']:.3f}"
                         f" {row['p_misaligned']:>10.3f} ± {row['p_misaligned_sem']:.3f}   {seeds}")
    diff = table.get("aligned_minus_unfiltered_p_misaligned")
    if diff:
        verdict = "lower on every seed" if diff["all_seeds_lower"] else "NOT lower on every seed"
        lines.append(f"aligned - unfiltered P(misaligned): {diff['mean']:+.3f} ({verdict})")
    return "\n".join(lines)


def plot(table: dict, path: str) -> None:
    from megatron_align.optional import require

    require("matplotlib", "the demo plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [c for c in CONDITIONS if c in table]
    means = [table[c]["p_misaligned"] for c in names]
    sems = [table[c]["p_misaligned_sem"] for c in names]
    ax.bar(names, means, yerr=sems, color=["#c0504d", "#808080", "#4f81bd"][: len(names)], capsize=6, alpha=0.8)
    for i, c in enumerate(names):
        seeds = table[c]["per_seed_p_misaligned"]
        ax.scatter([i] * len(seeds), seeds, color="black", s=12, zorder=3)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("mean P(misaligned option)")
    ax.set_title("Alignment pretraining in miniature (held-out scenarios)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from megatron_align.demo.data import build_demo_data
    from megatron_align.eval.propensity import evaluate_checkpoint

    if args.quick:
        args.seeds, args.steps, args.documents = 1, 16, 600
    if args.steps < 5:
        raise UserError("--steps must be at least 5 (pretrain 80%, midtrain 20%)")
    started = time.time()
    out = os.path.abspath(args.out)
    data_dir, runs_dir = os.path.join(out, "data"), os.path.join(out, "runs")
    shutil.rmtree(runs_dir, ignore_errors=True)  # a demo is a fresh experiment
    summary = build_demo_data(data_dir, args.documents, args.documents // 2, args.documents // 4)
    print(f"data: {summary['documents']} documents; blocklist flagged {summary['filter_flag_rate']:.1%} of web; "
          f"{summary['heldout_scenarios']} held-out scenarios")
    log_path = os.path.join(out, "train.log")
    results: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
    for seed in range(args.seeds):
        checkpoints = run_condition_runs(args, data_dir, runs_dir, seed, log_path)
        for condition, ckpt in checkpoints.items():
            report = evaluate_checkpoint(ckpt, os.path.join(data_dir, "questions.jsonl"))
            results[condition].append(report)
            with open(os.path.join(runs_dir, f"{condition}_s{seed}", "propensity.json"), "w") as f:
                json.dump(report, f, indent=1)
        print(f"seed {seed}: " + ", ".join(f"{c} P(mis)={results[c][-1]['summary']['p_misaligned']['mean']:.3f}"
                                          for c in CONDITIONS) + f"  ({time.time() - started:.0f} s)")
    table = summarize(results)
    table["elapsed_s"] = time.time() - started
    table["settings"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(table, f, indent=1)
    text = format_table(table)
    with open(os.path.join(out, "results.txt"), "w") as f:
        f.write(text + "\n")
    plot(table, os.path.join(out, "demo.png"))
    print(text)
    print(f"wrote {out}/results.json, results.txt, demo.png; training logs in {log_path} ({table['elapsed_s']:.0f} s)")
    return 0
