#!/usr/bin/env python
"""The stages of the one-call GPU check (benchmarks/gpu_check.sh runs this after installing the wheels).

Each stage runs in its own process with a time limit, its result goes into one JSON summary
(``<out>/gpu_check.json``, rewritten after every stage, so a killed check still leaves what it measured)
and a table is printed at the end. Stages:

1. ``gpu_tests``: the ``gpu``-marked tests (``pytest -m gpu``).
2. ``throughput``: BF16 training throughput of ``examples/llama_1b.yaml`` on mock data for the local and
   portable specs (tokens/s, TFLOP/s per GPU, MFU) via benchmarks/throughput.py, at seq 2048, micro batch 2
   and global batch 16 (the local spec materialises the s x s scores; docs/benchmarks.md), to fit the time limit.
3. ``resume``: a NCCL run on one GPU with the DistributedOptimizer and async checkpoint save; a second run
   loads its mid-run checkpoint and must reproduce the losses of the steps after it (max relative diff).
4. ``fp8``: FP8 throughput with the te spec, only where Transformer Engine imports (else ``skipped``).

``--preflight-only`` checks what the stages need and exits: 0 when all is there, 3 naming what is missing
(no CUDA GPU, a wrong Python), so scarce GPU time is never spent on a check that cannot finish.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_MISSING = 3
STAGES = ("gpu_tests", "throughput", "resume", "fp8")


def preflight(python_minor: tuple[int, int] = (3, 12)) -> list[str]:
    """What is missing for the GPU stages (empty = ready)."""
    problems = []
    if sys.version_info[:2] != python_minor:
        problems.append(f"Python {'.'.join(map(str, python_minor))} needed, this is {sys.version.split()[0]}")
    try:
        import torch
    except ImportError:
        return problems + ["torch is not installed (the machine's CUDA build of torch is expected)"]
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    elif not torch.cuda.is_available():
        problems.append("no CUDA GPU visible (torch.cuda.is_available() is False)")
    for module in ("megatron.core", "megatron_align", "omegaconf", "pytest"):
        try:
            __import__(module)
        except ImportError as err:
            problems.append(f"{module} does not import ({err}); were the wheels installed?")
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
        return all(s["status"] != "failed" for s in self.data["stages"].values())

    def write(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, self.path)

    def table(self) -> str:
        lines = [f"{'stage':11} {'status':8} {'s':>6}  figures"]
        for name, s in self.data["stages"].items():
            figures = {k: v for k, v in s.items() if k not in ("status", "seconds")}
            lines.append(f"{name:11} {s['status']:8} {s['seconds']:6.0f}  {_figures(figures)}")
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


def _run(cmd: list[str], timeout: int, log: str) -> tuple[int, float]:
    started = time.time()
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.time() - started


def _tail(log: str, n: int = 3) -> str:
    with open(log, errors="replace") as f:
        return " | ".join(line.strip() for line in f.readlines()[-n:])


def stage_gpu_tests(summary: Summary, out: str, timeout: int) -> None:
    log = os.path.join(out, "gpu_tests.log")
    code, seconds = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/model"],
                         timeout, log)
    summary.record("gpu_tests", "ok" if code == 0 else "failed", seconds, exit_code=code, last_lines=_tail(log))


def _throughput(out: str, name: str, specs: str, overrides: list[str], timeout: int) -> tuple[int, float, list]:
    path, log = os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.log")
    code, seconds = _run([sys.executable, "benchmarks/throughput.py", "--config", "examples/llama_1b.yaml",
                          "--specs", specs, "--steps", "8", "--warmup", "3", "--json", path, *overrides], timeout, log)
    results = []
    if code == 0 and os.path.exists(path):
        with open(path) as f:
            results = [{k: r[k] for k in ("spec", "precision", "tokens_per_s", "tflops_per_gpu", "mfu") if k in r}
                       for r in json.load(f)["results"]]
    return code, seconds, results


def _shape(global_batch: int) -> list[str]:
    return ["model.seq_length=2048", "train.micro_batch_size=2", f"train.global_batch_size={global_batch}"]


def stage_throughput(summary: Summary, out: str, timeout: int, global_batch: int) -> None:
    code, seconds, results = _throughput(out, "throughput", "local,portable", ["precision=bf16", *_shape(global_batch)],
                                         timeout)
    summary.record("throughput", "ok" if code == 0 and results else "failed", seconds, exit_code=code, results=results)


def stage_fp8(summary: Summary, out: str, timeout: int, global_batch: int) -> None:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as err:
        summary.record("fp8", "skipped", 0.0, reason=f"Transformer Engine not importable ({err})")
        return
    code, seconds, results = _throughput(out, "fp8", "te", ["precision=fp8", "fp8.recipe=tensorwise", *_shape(global_batch)],
                                         timeout)
    summary.record("fp8", "ok" if code == 0 and results else "failed", seconds, exit_code=code, results=results)


def resume_diff(reference: dict[int, float], resumed: dict[int, float]) -> float:
    """Largest relative loss difference over the resumed steps (inf when a step is missing)."""
    if not resumed or any(step not in reference for step in resumed):
        return math.inf
    return max(abs(loss - reference[step]) / max(abs(reference[step]), 1e-12) for step, loss in resumed.items())


def stage_resume(summary: Summary, out: str, timeout: int) -> None:
    from megatron_align.training.metrics import read_metrics

    common = ["data.mock=true", "precision=bf16", "model.spec=local", "optimizer.distributed=true",
              "checkpoint.async_save=true", "checkpoint.interval=3", "train.global_batch_size=8",
              "model.num_layers=4", "model.hidden_size=1024", "model.ffn_hidden_size=4096",
              "model.num_attention_heads=16", "model.num_query_groups=4", "model.seq_length=1024", "logging.interval=1"]
    started, losses = time.time(), {}
    for name, extra in (("reference", []), ("resumed", ["checkpoint.load=" + os.path.join(out, "reference", "checkpoints",
                                                                                          "iter_0000003")])):
        run = os.path.join(out, name)
        log = os.path.join(out, f"resume_{name}.log")
        code, _ = _run([sys.executable, "-m", "megatron_align.cli", "train", "examples/llama_1b.yaml", f"run_dir={run}",
                        "train.steps=6", *common, *extra], timeout, log)
        if code != 0:
            summary.record("resume", "failed", time.time() - started, run=name, exit_code=code, last_lines=_tail(log))
            return
        losses[name] = {r["step"]: r["loss"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))}
    diff = resume_diff(losses["reference"], losses["resumed"])
    ok = sorted(losses["resumed"]) == [4, 5, 6] and diff <= 1e-3
    summary.record("resume", "ok" if ok else "failed", time.time() - started, resumed_steps=sorted(losses["resumed"]),
                   max_rel_loss_diff=diff)


def environment() -> dict:
    import importlib.metadata as md

    env = {"python": sys.version.split()[0]}
    for dist in ("torch", "megatron-core", "megatron-align", "transformer-engine", "nvidia-resiliency-ext"):
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
    try:
        from megatron_align.training import async_save

        writer = async_save.choose()
        env["async_save"] = f"{writer.name} ({writer.reason})"
    except ImportError:
        pass
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "gpu_check"))
    parser.add_argument("--preflight-only", action="store_true")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--global-batch", type=int, default=16, help="throughput runs' global batch (seq 2048)")
    parser.add_argument("--stage-timeout", type=int, default=150, help="seconds per stage process")
    args = parser.parse_args()

    summary = Summary(os.path.join(args.out, "gpu_check.json"), environment())
    problems = preflight()
    summary.data["preflight"] = problems
    summary.write()
    if problems:
        print("gpu_check: cannot run here:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return EXIT_MISSING
    if args.preflight_only:
        print("gpu_check: preflight ok")
        return 0
    run = {"gpu_tests": lambda: stage_gpu_tests(summary, args.out, args.stage_timeout),
           "throughput": lambda: stage_throughput(summary, args.out, args.stage_timeout, args.global_batch),
           "resume": lambda: stage_resume(summary, args.out, args.stage_timeout),
           "fp8": lambda: stage_fp8(summary, args.out, args.stage_timeout, args.global_batch)}
    for stage in args.stages.split(","):
        run[stage]()
        print(summary.table().splitlines()[-1], flush=True)
    summary.data["finished"] = time.time()
    summary.write()
    print(summary.table())
    print(f"summary: {summary.path}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
