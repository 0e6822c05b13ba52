"""`megatron-align plan`: rank parallel layouts for a config, or size checkpointing for a cluster.

Two forms, told apart by the first positional argument:

    megatron-align plan CONFIG.yaml [key=value ...] --gpus 64 --gpu h100-80gb [--top 10] [--json plan.json]
    megatron-align plan goodput --gpus 16384 --save-s 60 --restore-s 300 --restart-s 600 [--interval-s 1800]

The first reads the config exactly as ``train`` does (YAML + ``key=value`` overrides), prints the
feasible layouts ranked by estimated step time (memory breakdown in GiB, step time, tokens/s/GPU,
MFU), the config's own layout with its rank, and counts the infeasible ones by reason; the second prints the
Young / Daly / exact optimal checkpoint intervals, the expected goodput and a Monte Carlo check.
The formulas are in :mod:`megatron_align.parallel.planner` and :mod:`megatron_align.parallel.goodput`;
this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import collections
import os

from megatron_align.errors import UserError
from megatron_align.fileio import atomic_write_json
from megatron_align.parallel.goodput import DEFAULT_MTBF_HOURS_PER_GPU, FailureModel, goodput_report
from megatron_align.parallel.planner import (
    GPU_ALIASES,
    GPUS,
    PRECISIONS,
    PlanOptions,
    PlanResult,
    count_parameters,
    evaluate_layout,
    get_gpu,
    load_plan_inputs,
    plan,
)

GOODPUT = "goodput"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="CONFIG|goodput",
                        help="a training YAML to plan layouts for, or the word 'goodput' for the checkpoint model")
    parser.add_argument(
        "overrides", nargs="*", help="key=value config overrides, as for train (e.g. train.global_batch_size=128)"
    )
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs in the job")
    layout = parser.add_argument_group("layout planning (plan CONFIG)")
    layout.add_argument("--gpu", default="h100-80gb", help=f"GPU type: {', '.join([*GPUS, *GPU_ALIASES])}")
    layout.add_argument("--top", type=int, default=10, help="feasible layouts to print")
    layout.add_argument("--json", dest="json_path", help="write every evaluated layout (with reasons) to this file")
    layout.add_argument(
        "--precision", choices=PRECISIONS, help="default: the config's precision if bf16/fp8/fp32, else bf16"
    )
    layout.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per NVLink node (TP must fit in one)")
    layout.add_argument("--efficiency", type=float, help="fraction of BF16 peak reached by the kernels (default 0.6)")
    layout.add_argument("--overhead-gib", type=float, help="fixed per-GPU memory overhead in GiB (default 4)")
    layout.add_argument("--show-infeasible", type=int, default=0, metavar="K",
                        help="also print the K infeasible layouts closest to fitting, with reasons")
    goodput = parser.add_argument_group("checkpoint goodput (plan goodput)")
    goodput.add_argument("--mtbf-hours-per-gpu", type=float, default=DEFAULT_MTBF_HOURS_PER_GPU,
                         help=f"per-GPU mean time between failures (default {DEFAULT_MTBF_HOURS_PER_GPU:.0f} h: "
                              "Llama 3 405B, 419 interruptions in 54 days on 16,384 GPUs)")
    goodput.add_argument("--save-s", type=float, help="seconds one checkpoint save blocks training")
    goodput.add_argument("--restore-s", type=float, help="seconds to load a checkpoint after a restart")
    goodput.add_argument("--restart-s", type=float, help="seconds to tear down, reschedule and re-initialise")
    goodput.add_argument("--interval-s", type=float, help="evaluate and simulate this interval (default: the optimum)")
    goodput.add_argument("--trials", type=int, default=256, help="Monte Carlo jobs to simulate")
    goodput.add_argument("--seed", type=int, default=0, help="Monte Carlo seed")


def run(args: argparse.Namespace) -> int:
    if args.target == GOODPUT:
        if args.overrides:
            raise UserError(f"plan goodput takes no key=value overrides (got {' '.join(args.overrides)})")
        return _run_goodput(args)
    return _run_layouts(args)


# ---------------------------------------------------------------- layouts
def _run_layouts(args: argparse.Namespace) -> int:
    inputs = load_plan_inputs(args.target, args.overrides, world_size=args.gpus)
    gpu = get_gpu(args.gpu)
    overrides = {"compute_efficiency": args.efficiency, "overhead_gib": args.overhead_gib}
    options = PlanOptions(precision=args.precision or inputs.precision or "bf16", gpus_per_node=args.gpus_per_node,
                          **{k: v for k, v in overrides.items() if v is not None})
    model = inputs.model
    results = plan(model, args.gpus, gpu, inputs.global_batch_size, options)
    feasible = [r for r in results if r.feasible]
    infeasible = [r for r in results if not r.feasible]
    print(
        f"model: {count_parameters(model) / 1e9:.2f}B parameters, {model.num_layers} layers, "
        f"hidden {model.hidden_size}, "
        f"seq {model.seq_length}, global batch {inputs.global_batch_size}"
    )
    if inputs.note:
        print(inputs.note)
    print(f"cluster: {args.gpus} x {gpu.name} ({gpu.memory_gib:.1f} GiB, {options.precision}), "
          f"{len(results)} layouts evaluated, {len(feasible)} feasible")
    if feasible:
        print(_table(feasible[: max(args.top, 0)], start=1))
    else:
        print("no feasible layout: add GPUs, use a GPU with more memory, or shrink the model / micro batch")
    if inputs.configured is not None:
        own = evaluate_layout(model, inputs.configured, gpu, options, inputs.global_batch_size)
        rank = next((i for i, r in enumerate(feasible, 1) if r.layout == own.layout), None)
        verdict = (f"rank {rank} of {len(feasible)} feasible" if rank else
                   "feasible, outside the searched candidates" if own.feasible else "infeasible")
        print(f"the config's own layout ({own.layout.label}, micro batch {own.layout.micro_batch_size}, recompute "
              f"{own.layout.recompute}): {verdict}")
        if not rank or rank > args.top:  # a row of the table above is not printed twice
            print(_table([own], start=rank or 0))
    counts = collections.Counter(_reason_kind(reason) for r in infeasible for reason in r.reasons)
    if counts:
        print("infeasible: " + ", ".join(f"{kind} x{n}" for kind, n in counts.most_common()))
    if args.show_infeasible and infeasible:
        closest = sorted(infeasible, key=lambda r: (len(r.reasons), r.memory.total))[: args.show_infeasible]
        print(_table(closest, start=1))
    if args.json_path:
        payload = {
            "config": os.path.abspath(args.target),
            "overrides": args.overrides,
            "gpus": args.gpus,
            "gpu": gpu.name,
            "global_batch_size": inputs.global_batch_size,
            "parameters": count_parameters(model),
            "options": vars(options),
            "results": [r.to_dict() for r in results],
        }
        directory = os.path.dirname(os.path.abspath(args.json_path))
        if not os.path.isdir(directory):
            raise UserError(f"--json {args.json_path}: directory {directory} does not exist")
        atomic_write_json(args.json_path, payload, indent=1)
        print(f"wrote {len(results)} layouts to {args.json_path}")
    return 0 if feasible else 1


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0] if reason.startswith("OOM") else reason.split(" ")[0]


def _table(results: list[PlanResult], start: int) -> str:
    header = (f"{'#':>3}  {'layout':<24}{'mbs':>4} {'recomp':<10}{'dopt':<5}{'weights':>8}{'grads':>7}{'optim':>7}"
              f"{'act':>7}{'other':>7}{'total':>7}  {'step s':>8}{'tok/s/GPU':>10}{'MFU':>6}  status")
    lines = [header, "-" * len(header)]
    for i, r in enumerate(results, start):
        g = r.memory.gib()
        status = "ok" if r.feasible else "; ".join(r.reasons)
        lines.append(
            f"{i:>3}  {r.layout.label:<24}{r.layout.micro_batch_size:>4} {r.layout.recompute:<10}"
            f"{'yes' if r.layout.distributed_optimizer else 'no':<5}{g['params']:>8.1f}{g['grads']:>7.1f}"
            f"{g['optimizer']:>7.1f}{g['activations']:>7.1f}{g['fp8'] + g['overhead']:>7.1f}{g['total']:>7.1f}  "
            f"{r.step_time_s:>8.3f}{r.tokens_per_s_per_gpu:>10.0f}{r.mfu:>6.1%}  {status}")
    lines.append("memory in GiB on the worst GPU; other = FP8 buffers + fixed overhead")
    return "\n".join(lines)


# ---------------------------------------------------------------- goodput
def _run_goodput(args: argparse.Namespace) -> int:
    missing = [flag for flag, value in (("--save-s", args.save_s), ("--restore-s", args.restore_s),
                                        ("--restart-s", args.restart_s)) if value is None]
    if missing:
        raise UserError(f"plan goodput needs {', '.join(missing)} (seconds)")
    if args.trials <= 0:
        raise UserError(f"--trials={args.trials}: must be > 0")
    model = FailureModel(num_gpus=args.gpus, save_s=args.save_s, restore_s=args.restore_s,
                         restart_s=args.restart_s, mtbf_hours_per_gpu=args.mtbf_hours_per_gpu)
    report = goodput_report(model, args.interval_s, trials=args.trials, seed=args.seed)
    sim = report.simulated
    print(f"cluster: {args.gpus} GPUs, per-GPU MTBF {args.mtbf_hours_per_gpu:,.0f} h -> a failure every "
          f"{report.cluster_mtbf_s / 3600:.2f} h ({86400 / report.cluster_mtbf_s:.1f} per day)")
    print(f"cost: save {args.save_s:g} s, restore {args.restore_s:g} s, restart {args.restart_s:g} s")
    print(f"{'interval':<22}{'seconds':>10}{'minutes':>9}{'goodput':>9}")
    rows = [("Young sqrt(2*d*M)", report.young_s, report.goodput_young),
            ("Daly (higher order)", report.daly_s, report.goodput_daly),
            ("exact optimum", report.exact_s, report.goodput_exact)]
    if args.interval_s is not None:
        rows.append(("--interval-s", report.chosen_s, report.goodput_chosen))
    for name, seconds, goodput in rows:
        print(f"{name:<22}{seconds:>10.0f}{seconds / 60:>9.1f}{goodput:>9.2%}")
    print(f"Monte Carlo at {report.chosen_s:.0f} s: goodput {sim.goodput:.2%} +/- {sim.stderr:.2%} "
          f"({sim.trials} jobs of {sim.work_s / 3600:,.0f} h, {sim.mean_failures:.0f} failures each; "
          f"formula {report.goodput_chosen:.2%})")
    return 0
