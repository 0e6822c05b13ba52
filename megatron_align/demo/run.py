"""The paper's experiment in miniature, on CPU, no downloads (``megatron-align demo``).

Three conditions, several seeds, one tiny Llama-style model each (trained by `megatron-align train`):

- **unfiltered**: pretrain + midtrain on ``web`` (general text + the web's mostly-misaligned AI discourse);
- **filtered**: the same on ``web_filtered`` (two-stage blocklist, flagged documents resampled);
- **aligned**: the unfiltered pretraining checkpoint, then midtraining with synthetic aligned-AI
  documents upsampled into the mix (the paper: ~1% of midtraining tokens; here ``--aligned-share``
  of midtraining samples, because the run is ~10^7 times shorter).

Unfiltered and aligned share their pretraining phase exactly (one run, resumed twice), as in the
paper's design. Each final checkpoint is scored with the propensity eval on held-out scenarios
(never in any training document): both option orders x all template variants, in letter mode
(the next letter after ``Answer: (``) and, beside it, cloze mode (each option's own text). The table reports
misalignment rate and mean P(misaligned) per condition, mean ± SEM over seeds. Design, deviations
from the paper and measured results: docs/demo.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from megatron_align.demo.data import SOURCE_JSONL, DemoDataConfig, build_demo_data, tokenizer_model
from megatron_align.demo.report import (
    CONDITIONS,
    format_table,
    log_summary_to_mlflow,
    plot,
    store_uri,
    summarize,
    with_cloze,
)
from megatron_align.errors import UserError
from megatron_align.fileio import atomic_write_json, atomic_write_text

EXPERIMENT = "megatron_align_demo"
GLOBAL_BATCH = 16
"""Sequences per optimizer step (x 128 tokens): small batches, many steps, for a 2-core budget."""


@dataclass
class DemoSettings:
    """What one demo runs; the `demo` verb's flags (``--help`` has each one's meaning)."""

    out: str = "runs/demo"
    seeds: int = 3
    steps: int = 600
    midtrain_fraction: float = 0.25
    aligned_share: float = 0.8
    lr: float = 3e-3
    world_size: int = 1
    jobs: int = field(default_factory=lambda: min(cpu_cores(), 4))
    tracking: str = "mlflow"
    quick: bool = False


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_threads(args: DemoSettings) -> int:
    """torch threads per rank: this process's cores shared among ``--jobs`` runs of ``--world-size`` ranks."""
    return max(1, cpu_cores() // (args.jobs * args.world_size))


def _open_store(out: str) -> None:
    from megatron_align.tracking.backends import ensure_experiment, import_mlflow

    import_mlflow()  # first: telemetry off and mlflow's INFO chatter quiet before the client exists
    from mlflow.tracking import MlflowClient

    uri = store_uri(out)
    os.makedirs(os.path.dirname(uri[len("sqlite:///"):]), exist_ok=True)
    ensure_experiment(MlflowClient(tracking_uri=uri), uri, EXPERIMENT)


def _model_config() -> dict:
    return {"num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 336, "num_attention_heads": 4,
            "num_query_groups": 4, "seq_length": 128, "tie_embeddings": True}


def pretrain_steps(args: DemoSettings) -> int:
    return max(1, round(args.steps * (1.0 - args.midtrain_fraction)))


def _train_config(args: DemoSettings, data_dir: str, run_dir: str, seed: int, pretrain: dict, midtrain: dict,
                  condition: str) -> dict:
    pre, batch = pretrain_steps(args), GLOBAL_BATCH
    tracking: dict = {"backend": args.tracking}
    if args.tracking == "mlflow":  # one local store for the whole demo (sqlite file: no server, no network)
        tracking.update(uri=store_uri(args.out),
                        experiment=EXPERIMENT, run_name=os.path.basename(run_dir),
                        tags={"condition": condition, "seed": str(seed)})
    if args.tracking != "none":
        tracking["plots"] = False  # the demo draws its own plot; per-run plots cost seconds each
    return {
        "run_dir": run_dir,
        "model": _model_config(),
        "parallel": {"world_size": args.world_size, "cpu_threads": cpu_threads(args)},
        "train": {"steps": args.steps, "global_batch_size": batch,
                  "micro_batch_size": batch // args.world_size, "seed": seed},
        "optimizer": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": max(1, args.steps // 20),
                      "decay_style": "WSD", "wsd_decay_steps": args.steps - pre, "weight_decay": 0.01},
        "data": {"sources": [{"name": n, "prefix": os.path.join(data_dir, n)} for n in SOURCE_JSONL],
                 "tokenizer": {"kind": "sentencepiece", "model": tokenizer_model(data_dir)},
                 "mixture": {"seed": seed, "block_size": 64, "default_max_repetitions": 50.0,
                             "phases": [{"name": "pretrain", "samples": pre * batch, "weights": pretrain},
                                        {"name": "midtrain", "fraction": (args.steps - pre) / args.steps,
                                         "weights": midtrain}]}},
        "checkpoint": {"interval": 0, "keep_last": 1, "keep_every": pre},
        "tracking": tracking,
        "logging": {"interval": max(1, args.steps // 20)},
    }


@dataclass
class Job:
    """One subprocess of the demo (a training run or an eval), started once the jobs it ``needs`` have succeeded."""

    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()


def run_jobs(jobs: list[Job], slots: int, log_dir: str, on_done=None) -> None:
    """Run ``jobs``, at most ``slots`` at a time; among the ready ones the earliest in the list goes first.

    Each job logs to ``<log_dir>/<name>.log``. The first failure terminates the running jobs and raises a
    UserError naming the job and its log; so does an interrupt. ``on_done(job)`` is called as each succeeds.
    """
    names = [job.name for job in jobs]
    for i, job in enumerate(jobs):
        missing = [n for n in job.needs if n not in names[:i]]
        if missing:
            raise ValueError(f"demo job {job.name} needs {missing}, which are not earlier jobs")
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NTASKS"):
        env.pop(var, None)  # each run spawns its own local ranks, even when the demo runs inside a job
    pending, running, done = list(jobs), {}, set()
    try:
        while pending or running:
            for job in [j for j in pending if done.issuperset(j.needs)][: max(0, slots - len(running))]:
                pending.remove(job)
                log = open(os.path.join(log_dir, f"{job.name}.log"), "w")
                running[job.name] = (
                    job,
                    subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env),
                    log,
                )
            time.sleep(0.1)
            for name, (job, proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if proc.returncode != 0:
                    raise UserError(f"demo job {name} failed with exit code {proc.returncode}; see "
                                    f"{os.path.join(log_dir, name + '.log')}")
                done.add(name)
                if on_done is not None:
                    on_done(job)
    finally:
        for _, proc, _log in running.values():  # a failure elsewhere or Ctrl-C: stop the rest (train forwards it)
            proc.terminate()
        for _, proc, log in running.values():
            proc.wait()
            log.close()


OUT_MARKER = ".megatron_align_demo"
"""Written into ``--out`` by the demo; only a directory holding it is ever cleared by a later demo."""
_OUTPUTS = ("data", "runs", "mlflow", "summary", "logs", "results.json", "results.txt", "demo.png", "demo_cloze.png")


def claim_out_dir(path: str) -> str:
    """Make ``path`` the demo's output directory and clear what an earlier demo left there; returns it absolute.

    A demo is a fresh experiment, so nothing old may be left looking new. But the demo deletes only what
    it wrote itself: a non-empty directory without :data:`OUT_MARKER` (``--out .`` in a project with real
    ``runs/``, say) is refused untouched.
    """
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; the demo needs a directory")
    marker = os.path.join(out, OUT_MARKER)
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(marker):
        raise UserError(f"--out {out} is not empty and was not written by `megatron-align demo` (no {OUT_MARKER}); "
                        "the demo replaces data/, runs/, mlflow/, logs/ and results.* there, so it only reuses its own "
                        "directories. Pick a new or empty directory, or delete this one yourself.")
    os.makedirs(out, exist_ok=True)
    with open(marker, "w") as f:
        f.write("output directory of `megatron-align demo`; a later demo with this --out replaces its contents\n")
    for name in _OUTPUTS:
        target = os.path.join(out, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)
    return out


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "megatron_align.cli", *argv]


def _write_config(config: dict) -> str:
    os.makedirs(config["run_dir"], exist_ok=True)
    path = os.path.join(config["run_dir"], "demo_config.yaml")
    atomic_write_text(path, yaml.safe_dump(config))
    return path


def seed_jobs(args: DemoSettings, data_dir: str, runs_dir: str, seed: int) -> list[Job]:
    """One seed's training runs and evals. Unfiltered and aligned share the unfiltered pretraining run."""
    pre = pretrain_steps(args)
    web, filt = {"web": 1.0}, {"web_filtered": 1.0}
    aligned_mid = {"web": 1.0 - args.aligned_share, "aligned": args.aligned_share}
    unf = _train_config(args, data_dir, os.path.join(runs_dir, f"unfiltered_s{seed}"), seed, web, web, "unfiltered")
    fil = _train_config(args, data_dir, os.path.join(runs_dir, f"filtered_s{seed}"), seed, filt, filt, "filtered")
    ali = _train_config(args, data_dir, os.path.join(runs_dir, f"aligned_s{seed}"), seed, web, aligned_mid, "aligned")
    unf_path, fil_path, ali_path = _write_config(unf), _write_config(fil), _write_config(ali)
    pretrained = os.path.join(unf["run_dir"], "checkpoints", f"iter_{pre:07d}")
    s = f"s{seed}"
    jobs = [Job(f"unfiltered_{s}.pretrain", _cli("train", unf_path, f"train.stop_at_step={pre}")),
            Job(f"filtered_{s}.train", _cli("train", fil_path)),
            Job(f"unfiltered_{s}.midtrain", _cli("train", unf_path), needs=(f"unfiltered_{s}.pretrain",)),
            Job(f"aligned_{s}.midtrain", _cli("train", ali_path, f"checkpoint.load={pretrained}",
                                              "data.mixture.allow_fingerprint_change=true"),
                needs=(f"unfiltered_{s}.pretrain",))]
    questions = os.path.join(data_dir, "questions.jsonl")
    for condition, config, trained in (("unfiltered", unf, "midtrain"), ("filtered", fil, "train"),
                                       ("aligned", ali, "midtrain")):
        jobs.append(Job(f"{condition}_{s}.eval", _cli(
            "eval", "propensity", "--checkpoint", os.path.join(config["run_dir"], "checkpoints"),
            "--questions", questions, "--out", os.path.join(config["run_dir"], "propensity.json")),
            needs=(f"{condition}_{s}.{trained}",)))
        jobs.append(Job(f"{condition}_{s}.eval_cloze", _cli(
            "eval", "propensity", "--checkpoint", os.path.join(config["run_dir"], "checkpoints"), "--scoring", "cloze",
            "--questions", questions, "--out", os.path.join(config["run_dir"], "propensity_cloze.json")),
            needs=(f"{condition}_{s}.{trained}",)))
    return jobs


def _seconds_per_step(run_dir: str) -> list[float]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r["step_time_s"] for r in map(json.loads, f) if "step_time_s" in r]


def _apply_quick(args: DemoSettings) -> None:
    args.seeds, args.steps = 1, 40


def run_demo(args: DemoSettings) -> int:
    """Build the data, train and score every condition and seed, write the table and plots under ``args.out``."""
    data_config = DemoDataConfig()
    if args.quick:
        _apply_quick(args)
        data_config = DemoDataConfig(num_general=300, num_web_ai=900, num_aligned=400, num_generated=500)
    if args.steps < 4 or args.seeds < 1:
        raise UserError("--steps must be >= 4 and --seeds >= 1")
    if not 0.0 < args.midtrain_fraction < 1.0 or not 0.0 < args.aligned_share <= 1.0:
        raise UserError("--midtrain-fraction must be in (0, 1) and --aligned-share in (0, 1]")
    if args.jobs < 1:
        raise UserError("--jobs must be >= 1")
    if GLOBAL_BATCH % args.world_size:
        raise UserError(f"--world-size {args.world_size} must divide the global batch size {GLOBAL_BATCH}")
    started = time.time()
    out = claim_out_dir(args.out)
    args.out = out
    data_dir, runs_dir = os.path.join(out, "data"), os.path.join(out, "runs")
    summary = build_demo_data(data_dir, data_config)
    print(f"data: {summary['documents']} documents, {summary['tokens']} tokens; blocklist flagged "
          f"{summary['filter_flag_rate']:.1%} of web; {summary['heldout_scenarios']} held-out scenarios "
          f"({time.time() - started:.0f} s)", flush=True)
    if args.tracking == "mlflow":  # create the shared store once, before runs write to it concurrently
        _open_store(out)
    jobs = [job for seed in range(args.seeds) for job in seed_jobs(args, data_dir, runs_dir, seed)]
    log_dir = os.path.join(out, "logs")
    print(f"{len(jobs)} jobs (training runs and evals), {args.jobs} at a time x {cpu_threads(args)} CPU "
          f"thread(s); logs in {log_dir}", flush=True)
    finished = []

    def report_progress(job: Job) -> None:
        finished.append(job.name)
        note = ""
        if job.name.endswith((".eval", ".eval_cloze")):
            with open(job.argv[job.argv.index("--out") + 1]) as f:
                note = f": P(misaligned) {json.load(f)['summary']['p_misaligned']['mean']:.3f}"
        print(f"[{time.time() - started:5.0f} s] {len(finished)}/{len(jobs)} {job.name}{note}", flush=True)

    run_jobs(jobs, args.jobs, log_dir, report_progress)
    results: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
    cloze: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
    step_times: list[float] = []
    for seed in range(args.seeds):
        for condition in CONDITIONS:
            run_dir = os.path.join(runs_dir, f"{condition}_s{seed}")
            for name, into in (("propensity.json", results), ("propensity_cloze.json", cloze)):
                with open(os.path.join(run_dir, name)) as f:
                    into[condition].append(json.load(f))
            step_times += _seconds_per_step(run_dir)
    table = with_cloze(summarize(results), cloze)
    table["elapsed_s"] = time.time() - started
    table["mean_step_time_s"] = sum(step_times) / len(step_times) if step_times else None
    table["load_average"] = list(os.getloadavg())
    table["settings"] = {**dataclasses.asdict(args),
                         "data": summary["config"], "model": _model_config()}
    table["data"] = {k: summary[k] for k in ("documents", "tokens", "filter_flag_rate", "tokenizer")}
    atomic_write_json(os.path.join(out, "results.json"), table, indent=1)
    text = format_table(table)
    atomic_write_text(os.path.join(out, "results.txt"), text + "\n")
    plot(table, os.path.join(out, "demo.png"))
    plot(table["cloze"]["sum"], os.path.join(out, "demo_cloze.png"), "cloze scoring (summed log-likelihood)")
    if args.tracking == "mlflow":
        run_id = log_summary_to_mlflow(out, table, EXPERIMENT)
        print(f"MLflow: experiment {EXPERIMENT!r} (summary run {run_id}) in {store_uri(out)}; "
              f"browse with `mlflow ui --backend-store-uri {store_uri(out)}`")
    print(text)
    print(f"wrote {out}/results.json, results.txt, demo.png; logs in {log_dir} "
          f"({table['elapsed_s']:.0f} s, load average {table['load_average'][0]:.1f})")
    return 0
