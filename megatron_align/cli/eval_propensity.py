"""`megatron-align eval propensity`: score a checkpoint (or ``--hf`` directory) on alignment-propensity MCQs.

Parses the flags, spawns ranks for a multi-rank checkpoint eval, and writes/prints the report (table, ``--out``
JSON, ``--plot``, ``--mlflow``); the scoring is :mod:`megatron_align.eval.propensity`.
"""

from __future__ import annotations

import argparse
import os

from megatron_align.errors import UserError
from megatron_align.eval.items import SCORINGS, load_items
from megatron_align.eval.propensity import evaluate, evaluate_checkpoint, evaluate_checkpoint_on_rank, tracking_record
from megatron_align.eval.report import format_table, write_report
from megatron_align.eval.templates import load_templates, resolve_variants
from megatron_align.optional import optional_import, require


def _emit(report: dict, args: argparse.Namespace) -> None:
    """The report's outputs, either mode: table, JSON (``--out``), plot (``--plot``), MLflow run (``--mlflow``)."""
    if report.get("mode") == "generate":
        from megatron_align.eval.generate import format_table as generate_table

        print(generate_table(report))
    else:
        print(format_table(report))
    if args.out:
        write_report(report, args.out)
        print(f"report written to {args.out}")
    if args.plot:
        from megatron_align.tracking.plots import plot_report

        print(f"plot written to {plot_report(report, args.plot)}")
    if args.mlflow:
        import tempfile

        from megatron_align.tracking.backends import log_finished_run

        with tempfile.TemporaryDirectory(prefix="megatron_align_eval_") as tmp:
            files = [args.out or os.path.join(tmp, "propensity.json"), args.plot or os.path.join(tmp, "propensity.png")]
            if not args.out:
                write_report(report, files[0])
            if not args.plot and optional_import("matplotlib") is not None:
                from megatron_align.tracking.plots import plot_report

                plot_report(report, files[1])
            params, metrics = tracking_record(report)
            run_id = log_finished_run(args.mlflow, args.experiment, args.run_name or f"propensity_{params['mode']}",
                                      params=params, metrics=metrics, artifacts=files,
                                      tags={"megatron_align.eval": "propensity"})
        print(f"MLflow run {run_id} (experiment {args.experiment!r}) in {args.mlflow}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("logprob", "generate"), default="logprob",
                        help="logprob: score the answer by log-likelihood (base models); generate: chat models answer "
                             "through their chat template under several system prompts and the letter is parsed "
                             "(--hf directories; see megatron_align.eval.generate)")
    parser.add_argument("--scoring", choices=SCORINGS, default="letter",
                        help="logprob mode: letter = the letter after the answer cue; cloze = each option's own text "
                             "(sum and length-normalised, like lm-eval's acc/acc_norm)")
    parser.add_argument("--templates", help="YAML file of extra/overriding prompt templates (shape of "
                                            "megatron_align/eval/templates.yaml)")
    parser.add_argument("--system-prompts", help="generate mode: YAML mapping name -> system prompt (null = none) "
                                                 "added to none/neutral/ai_persona")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="generate mode: tokens per answer (greedy)")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="generate mode: batched generation engine (vllm only when installed, on GPU)")
    parser.add_argument("--checkpoint", required=True,
                        help="megatron_align checkpoint (a run's checkpoints/ dir or one iter_* dir), or with --hf a "
                             "Hugging Face model directory")
    parser.add_argument("--questions", required=True, help="JSONL items: question, choices[2], misaligned_choice, "
                                                           "optional passage/topics/id")
    parser.add_argument(
        "--hf", action="store_true", help="--checkpoint is a Hugging Face directory (needs transformers)"
    )
    parser.add_argument("--out", help="write the JSON report here (atomically)")
    parser.add_argument("--plot", help="draw the report here as a PNG: mean ± SEM overall and per template (logprob) "
                                       "or per system prompt (generate)")
    parser.add_argument(
        "--mlflow",
        metavar="URI",
        help="log one MLflow run to this store (sqlite:///path/mlflow.db, "
        "http://server:5000): params, metrics, report + plot artifacts",
    )
    parser.add_argument(
        "--experiment", default="megatron_align", help="--mlflow: experiment name (created when missing)"
    )
    parser.add_argument("--run-name", help="--mlflow: run name (default: propensity_<mode>)")
    parser.add_argument("--variants", help="comma-separated template names from templates.yaml (or --templates), "
                                           "or all; default: the templates marked default (the paper's + 5 variants)")
    parser.add_argument("--single-order", action="store_true", help="score only the given option order")
    parser.add_argument("--max-items", type=int, help="use only the first N items")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (per data-parallel rank)")
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="keep the last N tokens of longer prompts (default: the model's seq_length; none for --hf)",
    )
    parser.add_argument("--world-size", type=int, default=1, help="ranks to spawn (checkpoint backend)")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (checkpoint backend)")
    parser.add_argument("--pipeline", type=int, default=1, help="pipeline-parallel size (checkpoint backend)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--tokenizer", default="hf",
                        help="--hf only: hf (the directory's tokenizer), byte, or sentencepiece:PATH")
    parser.add_argument("--device", help="--hf only: cpu or cuda (default: cuda when available)")


def _argv(args: argparse.Namespace) -> list[str]:
    argv = ["--checkpoint", args.checkpoint, "--questions", args.questions, "--scoring", args.scoring,
            "--batch-size", str(args.batch_size), "--world-size", str(args.world_size), "--tensor", str(args.tensor),
            "--pipeline", str(args.pipeline), "--precision", args.precision]
    for flag, value in (
        ("--out", args.out),
        ("--max-items", args.max_items),
        ("--max-prompt-tokens", args.max_prompt_tokens),
        ("--variants", args.variants),
        ("--templates", args.templates),
        ("--plot", args.plot),
        ("--mlflow", args.mlflow),
        ("--experiment", args.experiment),
        ("--run-name", args.run_name),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--single-order"] if args.single_order else [])


def run(args: argparse.Namespace) -> int:
    from megatron_align.parallel.spawn import distributed_env, spawn_local

    variants = resolve_variants(args.variants, load_templates(args.templates))
    if args.plot:  # missing dependencies fail before minutes of scoring, not after
        require("matplotlib", "eval propensity --plot")
    if args.mlflow:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:  # checked without importing it (slow, and telemetry)
            require("mlflow", "eval propensity --mlflow")
    if args.mode == "generate":
        from megatron_align.eval.generate import run_generate

        _emit(run_generate(args, variants), args)
        return 0
    for flag in ("batch_size", "world_size", "tensor", "pipeline"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    items = load_items(args.questions, args.max_items)  # schema errors surface before any rank starts
    options = dict(variants=variants, both_orders=not args.single_order, batch_size=args.batch_size,
                   max_prompt_tokens=args.max_prompt_tokens, scoring=args.scoring, templates=args.templates)
    if args.hf:
        if args.world_size != 1 or args.tensor != 1 or args.pipeline != 1:
            raise UserError("--hf runs in one process; drop --world-size/--tensor/--pipeline")
        from megatron_align.eval.scorers import HFScorer

        dtype = "auto" if args.precision == "auto" else args.precision
        scorer = HFScorer(args.checkpoint, tokenizer=args.tokenizer, device=args.device, dtype=dtype,
                          batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens)
        _emit(evaluate(scorer, items, variants, not args.single_order, {"questions": args.questions}, args.scoring,
                       args.templates), args)
        return 0
    joined = distributed_env()
    if joined is not None and (joined[1] > 1 or args.world_size == 1):
        rank, world_size, local_rank = joined
        report = evaluate_checkpoint_on_rank(
            args.checkpoint,
            items,
            rank,
            world_size,
            local_rank,
            tensor=args.tensor,
            pipeline=args.pipeline,
            precision=args.precision,
            questions=args.questions,
            **options,
        )
        if rank == 0:
            _emit(report, args)
        return 0
    if args.world_size == 1:
        report = evaluate_checkpoint(
            args.checkpoint, args.questions, max_items=args.max_items, precision=args.precision, **options
        )
        _emit(report, args)
        return 0
    if args.world_size % (args.tensor * args.pipeline):
        raise UserError(
            f"--world-size {args.world_size} is not divisible by --tensor x --pipeline = {args.tensor * args.pipeline}"
        )
    return spawn_local(["eval", "propensity", *_argv(args)], args.world_size)
