#!/usr/bin/env python
"""The stages of the one-call GPU check (benchmarks/gpu_check.sh runs this after installing the carried wheels).

One shot at a scarce GPU (15 minutes in all, 10 per command, at most 8 files of <= 16 MiB brought back): every
stage runs in its own process under a per-stage budget *and* one global deadline, in order of value, so a slow
stage costs the ones after it, never the summary. Stages:

1. ``imports``: every module a later stage imports, then ``megatron-align doctor --json``;
2. ``throughput``: BF16 steps of ``examples/llama_1b.yaml`` (Llama-3.2-1B's 128,256 vocabulary) on mock data,
   specs local and portable: tokens/s, TFLOP/s per GPU, MFU;
3. ``resume_mcore``: the DistributedOptimizer + async save with Megatron-Core's own writer; a second run loads the
   step-3 checkpoint and must reproduce the losses of steps 4-6 (``bitwise`` says whether exactly);
4. ``resume_nvrx``: the same with nvidia-resiliency-ext's writer (``skipped`` where it cannot run, with why);
5. ``gpu_tests``: the ``gpu``-marked tests;
6. ``fp8``: FP8 throughput with the te spec, only where Transformer Engine imports.

Output: ``<out>/gpu_check.json`` (rewritten after every stage) and at most one short log per stage (the tail of its
output); runs, checkpoints and full logs stay in ``--work`` (a temporary directory, never under ``<out>``).
``--rehearse`` runs the same stages on CPU with a tiny model (what a machine without a GPU can check: installs,
imports, the output layout, the budgets).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_MISSING = 3
STAGES = ("imports", "throughput", "resume_mcore", "resume_nvrx", "gpu_tests", "fp8")
BUDGETS = {"imports": 60, "throughput": 150, "resume_mcore": 120, "resume_nvrx": 120, "gpu_tests": 90, "fp8": 90}
"""Seconds per stage (the device gives 10 minutes per command; install + start-up take ~1 of them)."""
DEADLINE_S = 540
"""The whole check, from the shell script's start: well inside the device's 10-minute command limit."""
RESERVE_S = 15
"""Kept back from the deadline for writing the summary."""
MIN_STAGE_S = 20
"""A stage with less time than this left is skipped (recorded as such), not started."""
LOG_TAIL_BYTES = 64 * 1024
# What the device brings back from $OUT (docs/benchmarks.md).
MAX_FILES, MAX_FILE_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
GPU_TEST_FILES = ("tests/model/test_documents.py", "tests/model/test_fp8.py", "tests/model/test_portable.py")
"""The files with ``gpu``-marked tests (collecting only them keeps optional test dependencies out of the check)."""
IMPORTS = ("torch", "numpy", "yaml", "omegaconf", "xxhash", "psutil", "packaging", "pytest", "megatron.core",
           "megatron.core.optimizer.distrib_optimizer", "megatron.core.dist_checkpointing",
           "megatron_align", "megatron_align.cli", "megatron_align.training.trainer", "megatron_align.doctor",
           "megatron_align.model.portable")


class Deadline:
    """One wall-clock deadline for the whole check; each stage gets min(its budget, what is left - reserve)."""

    def __init__(self, end: float, reserve: float = RESERVE_S, minimum: float = MIN_STAGE_S, clock=time.time):
        self.end, self.reserve, self.minimum, self.clock = end, reserve, minimum, clock

    def left(self) -> float:
        return self.end - self.clock()

    def budget(self, stage_budget: float) -> float | None:
        """Seconds this stage may run, or None when too little is left to start it."""
        seconds = min(stage_budget, self.left() - self.reserve)
        return seconds if seconds >= self.minimum else None


def output_layout_problems(out: str) -> list[str]:
    """Why the device would not bring ``out`` back whole (empty = fine): file count, size, depth, names."""
    problems, files = [], []
    for root, dirs, names in os.walk(out):
        rel = os.path.relpath(root, out)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        rel = "" if rel == "." else rel
        for name in dirs + names:
            if not NAME_RE.match(name):
                problems.append(f"{os.path.join(rel, name)}: name outside letters, digits, '.', '_', '-'")
        if depth > MAX_DEPTH:
            problems.append(f"{rel}: {depth} folders deep (at most {MAX_DEPTH})")
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                problems.append(f"{os.path.join(rel, name)}: not a plain file")
                continue
            files.append(path)
            if os.path.getsize(path) > MAX_FILE_BYTES:
                problems.append(f"{os.path.join(rel, name)}: {os.path.getsize(path)} bytes (at most {MAX_FILE_BYTES})")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES})")
    return problems


def preflight(rehearse: bool, python_minor: tuple[int, int] = (3, 12)) -> list[str]:
    """What is missing for the stages (empty = ready)."""
    problems = []
    if sys.version_info[:2] != python_minor:
        problems.append(f"Python {'.'.join(map(str, python_minor))} needed, this is {sys.version.split()[0]}")
    try:
        import torch
    except ImportError:
        return problems + ["torch is not installed (the machine's CUDA build of torch is expected)"]
    if rehearse:
        return problems
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    elif not torch.cuda.is_available():
        problems.append("no CUDA GPU visible (torch.cuda.is_available() is False)")
    return problems


class Summary:
    """The check's one JSON file: environment, then one entry per stage, rewritten atomically after each."""

    def __init__(self, path: str, environment: dict) -> None:
        self.path = path
        self.data = {"environment": environment, "stages": {}, "started": time.time()}
        self.write()

    def record(self, stage: str, status: str, seconds: float, **figures) -> None:
        assert stage in STAGES and status in ("ok", "failed", "skipped"), (stage, status)
        self.data["stages"][stage] = {"status": status, "seconds": round(seconds, 1), **figures}
        self.write()

    @property
    def ok(self) -> bool:
        """No stage failed, and none was left out for lack of time (a check that did not check is no pass)."""
        return all(s["status"] != "failed" and not s.get("late") for s in self.data["stages"].values())

    def write(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, self.path)

    def table(self) -> str:
        lines = [f"{'stage':13} {'status':8} {'s':>6}  figures"]
        for name, s in self.data["stages"].items():
            figures = {k: v for k, v in s.items() if k not in ("status", "seconds")}
            lines.append(f"{name:13} {s['status']:8} {s['seconds']:6.0f}  {_figures(figures)}")
        return "\n".join(lines)


def _figures(figures: dict) -> str:
    parts = []
    for key, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):
            value = "; ".join(_figures(v) if isinstance(v, dict) else str(v) for v in value)
        parts.append(f"{key}={value}")
    return ", ".join(parts)


class Check:
    """The stages, with the paths and limits they share."""

    def __init__(self, out: str, work: str, deadline: Deadline, rehearse: bool) -> None:
        self.out, self.work, self.deadline, self.rehearse = out, work, deadline, rehearse
        self.summary = Summary(os.path.join(out, "gpu_check.json"), environment())

    def run(self, stage: str, cmds: list[list[str]], log_name: str | None = None) -> tuple[int, float, float]:
        """Run ``cmds`` in turn (stop at the first failure) within the stage's budget; the output's tail is copied to
        ``<out>/<log_name or stage>.log``. Returns (exit code, seconds, budget); 124 = out of time."""
        budget = self.deadline.budget(BUDGETS[stage]) or 0.0
        full_log = os.path.join(self.work, f"{log_name or stage}.log")
        started, code = time.time(), 0
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        with open(full_log, "w") as f:
            for cmd in cmds:
                left = budget - (time.time() - started)
                try:
                    code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                          timeout=max(left, 1)).returncode
                except subprocess.TimeoutExpired:
                    code = 124
                    f.write(f"\ngpu_check: stopped at the stage budget ({budget:.0f} s)\n")
                if code != 0:
                    break
        _copy_tail(full_log, os.path.join(self.out, f"{log_name or stage}.log"))
        return code, time.time() - started, budget

    def skip_if_late(self, stage: str) -> bool:
        if self.deadline.budget(BUDGETS[stage]) is None:
            self.summary.record(stage, "skipped", 0.0, reason=f"global deadline: {self.deadline.left():.0f} s left",
                                late=True)
            return True
        return False

    # -- stages -------------------------------------------------------------------------------------------------
    def imports(self) -> None:
        code_imports = f"import importlib; [importlib.import_module(m) for m in {IMPORTS!r}]; print('imports ok')"
        code, seconds, _ = self.run("imports", [[sys.executable, "-c", code_imports],
                                                [sys.executable, "-m", "megatron_align.cli", "doctor", "--json"]])
        doctor = {}
        with open(os.path.join(self.work, "imports.log"), errors="replace") as f:
            text = f.read()
        start = text.find("\n{")
        if code == 0 and start >= 0:
            try:
                report = json.loads(text[start:])
                doctor = {"async_save": report.get("async_save"), "features": report.get("features")}
            except json.JSONDecodeError:
                pass
        self.summary.record("imports", "ok" if code == 0 else "failed", seconds, exit_code=code, doctor=doctor,
                            last_lines=_tail(os.path.join(self.work, "imports.log")) if code else "")

    def _shape(self) -> list[str]:
        if self.rehearse:  # CPU: a tiny model at the real vocabulary, so the same code paths run in seconds
            return ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=256",
                    "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=128",
                    "train.micro_batch_size=1", "train.global_batch_size=2", "precision=auto"]
        return ["model.seq_length=2048", "train.micro_batch_size=2", "train.global_batch_size=16", "precision=bf16"]

    def _throughput(self, stage: str, specs: str, extra: list[str]) -> None:
        path = os.path.join(self.work, f"{stage}.json")
        steps = ["--steps", "2", "--warmup", "1"] if self.rehearse else ["--steps", "8", "--warmup", "3"]
        code, seconds, _ = self.run(stage, [[sys.executable, "benchmarks/throughput.py", "--config",
                                             "examples/llama_1b.yaml", "--specs", specs, *steps, "--json", path,
                                             *self._shape(), *extra]])
        results = []
        if code == 0 and os.path.exists(path):
            with open(path) as f:
                results = [{k: r[k] for k in ("spec", "precision", "tokens_per_s", "tflops_per_gpu", "mfu") if k in r}
                           for r in json.load(f)["results"]]
        self.summary.record(stage, "ok" if code == 0 and results else "failed", seconds, exit_code=code,
                            results=results, vocab_size=128256)

    def throughput(self) -> None:
        self._throughput("throughput", "local,portable", [])

    def fp8(self) -> None:
        try:
            import transformer_engine.pytorch  # noqa: F401
        except Exception as err:  # ImportError, or TE's extension failing to load
            self.summary.record("fp8", "skipped", 0.0, reason=f"Transformer Engine not importable ({err})")
            return
        self._throughput("fp8", "te", ["precision=fp8", "fp8.recipe=tensorwise"])

    def resume(self, writer: str) -> None:
        stage = f"resume_{writer}"
        if writer == "nvrx":
            reason = _writer_problem("nvrx")
            if reason:
                self.summary.record(stage, "skipped", 0.0, reason=reason)
                return
        from megatron_align.training.metrics import read_metrics

        if self.rehearse:  # two gloo ranks: the DistributedOptimizer shards over DP
            model = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=64",
                     "model.num_attention_heads=4", "model.num_query_groups=2", "parallel.world_size=2",
                     "train.global_batch_size=4", "train.micro_batch_size=1"]
        else:
            model = ["precision=bf16", "model.spec=local", "model.num_layers=4", "model.hidden_size=1024",
                     "model.ffn_hidden_size=4096", "model.num_attention_heads=16", "model.num_query_groups=4",
                     "model.seq_length=1024", "train.global_batch_size=8"]
        common = ["data.mock=true", "optimizer.distributed=true", "checkpoint.async_save=true",
                  f"checkpoint.async_writer={writer}", "checkpoint.interval=3", "logging.interval=1", "train.steps=6",
                  *model]
        runs = {name: os.path.join(self.work, stage, name) for name in ("reference", "resumed")}
        load = os.path.join(runs["reference"], "checkpoints", "iter_0000003")
        cli = [sys.executable, "-m", "megatron_align.cli", "train", "examples/llama_1b.yaml"]
        code, seconds, _ = self.run(stage, [[*cli, f"run_dir={runs['reference']}", *common],
                                            [*cli, f"run_dir={runs['resumed']}", f"checkpoint.load={load}", *common]])
        if code != 0:
            self.summary.record(stage, "failed", seconds, exit_code=code,
                                last_lines=_tail(os.path.join(self.work, f"{stage}.log")))
            return
        losses = {name: {r["step"]: r["loss"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))}
                  for name, run in runs.items()}
        diff = resume_diff(losses["reference"], losses["resumed"])
        ok = sorted(losses["resumed"]) == [4, 5, 6] and diff <= 1e-3
        self.summary.record(stage, "ok" if ok else "failed", seconds, resumed_steps=sorted(losses["resumed"]),
                            max_rel_loss_diff=diff, bitwise=diff == 0.0, writer=writer)

    def gpu_tests(self) -> None:
        code, seconds, _ = self.run("gpu_tests", [[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                   "-m", "gpu", *GPU_TEST_FILES]])
        # pytest exit 5 = nothing collected/selected: not a failure of the check
        status = "ok" if code in (0, 5) else "failed"
        self.summary.record("gpu_tests", status, seconds, exit_code=code,
                            last_lines=_tail(os.path.join(self.work, "gpu_tests.log")))


def resume_diff(reference: dict[int, float], resumed: dict[int, float]) -> float:
    """Largest relative loss difference over the resumed steps (inf when a step is missing)."""
    if not resumed or any(step not in reference for step in resumed):
        return math.inf
    return max(abs(loss - reference[step]) / max(abs(reference[step]), 1e-12) for step, loss in resumed.items())


def _writer_problem(writer: str) -> str | None:
    from megatron_align.errors import ConfigError
    from megatron_align.training import async_save

    try:
        async_save.choose(writer)
    except ConfigError as err:
        return str(err)
    return None


def _copy_tail(src: str, dst: str, limit: int = LOG_TAIL_BYTES) -> None:
    with open(src, "rb") as f:
        f.seek(max(0, os.path.getsize(src) - limit))
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data)


def _tail(log: str, n: int = 3) -> str:
    with open(log, errors="replace") as f:
        return " | ".join(line.strip() for line in f.readlines()[-n:])


def environment() -> dict:
    import importlib.metadata as md

    env = {"python": sys.version.split()[0]}
    for dist in ("torch", "megatron-core", "transformer-engine", "nvidia-resiliency-ext", "omegaconf", "numpy"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = None
    try:
        import torch

        env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        env["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="what comes back: gpu_check.json + short logs only")
    parser.add_argument("--work", help="runs and full logs (default: a new temporary directory)")
    parser.add_argument("--start", type=float, default=None, help="the check's start (epoch s; default now)")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds from --start for everything")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--rehearse", action="store_true", help="CPU rehearsal: tiny model, no GPU needed")
    parser.add_argument("--preflight-only", action="store_true")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_work.")
    deadline = Deadline((args.start or time.time()) + args.deadline)
    check = Check(args.out, work, deadline, args.rehearse)
    problems = preflight(args.rehearse)
    check.summary.data.update(preflight=problems, rehearse=args.rehearse, work=work)
    check.summary.write()
    if problems:
        print("gpu_check: cannot run here:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return EXIT_MISSING
    if args.preflight_only:
        print("gpu_check: preflight ok")
        return 0
    stages = {"imports": check.imports, "throughput": check.throughput, "resume_mcore": lambda: check.resume("mcore"),
              "resume_nvrx": lambda: check.resume("nvrx"), "gpu_tests": check.gpu_tests, "fp8": check.fp8}
    for stage in args.stages.split(","):
        if not check.skip_if_late(stage):
            stages[stage]()
        print(check.summary.table().splitlines()[-1], flush=True)
    check.summary.data["finished"] = time.time()
    check.summary.write()
    layout = output_layout_problems(args.out)
    if layout:
        check.summary.data["output_layout_problems"] = layout
        check.summary.write()
    print(check.summary.table())
    print(f"summary: {check.summary.path}; runs and full logs: {work}")
    return 0 if check.summary.ok and not layout else 1


if __name__ == "__main__":
    sys.exit(main())
