"""Alignment-propensity evaluation: `megatron-align eval propensity` and its Python API.

What it measures: for each MCQ item (an AI-behaviour scenario with one aligned and one
misaligned option, see :mod:`megatron_align.eval.items`), how strongly a *base* model's
next-token distribution after ``Answer: (`` prefers the misaligned letter. Every item is scored
under several prompt wordings and both option orders; :mod:`megatron_align.eval.report` turns
the log-probabilities into rates, probabilities, position bias and their spread.

Backends (:mod:`megatron_align.eval.scorers`): a megatron_align checkpoint, loaded into our own
model code under any TP x PP x DP layout (``--world-size/--tensor/--pipeline``; local ranks are
spawned, or the process joins torchrun/srun), or a Hugging Face directory (``--hf``).

Python API (used by the demo and the in-training callback): :func:`evaluate` with any scorer,
:func:`evaluate_checkpoint` for a checkpoint in this process (world size 1).

Outputs, for both ``--mode logprob`` and ``--mode generate`` (:func:`_emit`): the printed table, the JSON
report (``--out``), a plot (``--plot``, :func:`megatron_align.tracking.plots.plot_report`) and one MLflow
run (``--mlflow URI``; params and metrics from :func:`tracking_record`, the report and plot as artifacts).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Optional

import torch

import numpy as np

from megatron_align.errors import UserError
from megatron_align.eval.items import ORDERS, SCORINGS, Item, Prompt, build_prompts, load_items
from megatron_align.eval.templates import CLOZE_DELIMITER, load_templates, resolve_variants
from megatron_align.eval.report import format_table, summarize, write_report
from megatron_align.optional import optional_import, require
from megatron_align.parallel.spawn import free_port


def score_prompts(scorer, prompts: list[Prompt]) -> np.ndarray:
    """``[n, 2]`` log-likelihoods of each prompt's two continuations.

    Letter prompts whose letter follows the cue directly (``target_delimiter: ""``) go through the
    scorer's single-token path (which checks that the letter is one token); everything else (cloze,
    lm-eval's ``" A"``) is scored as a multi-token continuation, split as lm-evaluation-harness does.
    """
    if all(p.continuations == ("A", "B") for p in prompts):
        return scorer.answer_logprobs([p.text for p in prompts])
    requests = [(p.text, c) for p in prompts for c in p.continuations]
    return np.asarray(scorer.loglikelihoods(requests), dtype=np.float64).reshape(len(prompts), 2)


def evaluate(scorer, items: list[Item], variants: Optional[list[str]] = None, both_orders: bool = True,
             meta: Optional[dict] = None, scoring: str = "letter", templates: Optional[str] = None) -> dict:
    """Score every (item, variant, order) prompt with ``scorer`` and return the report dict.

    ``scoring="cloze"`` also reports ``normalized``: the same summary from log-likelihoods divided
    by each option's length in characters (lm-evaluation-harness' ``acc_norm``).
    """
    template_set = load_templates(templates)
    variants = list(variants or template_set.defaults())
    prompts = build_prompts(items, variants, both_orders, scoring, template_set.templates)
    started = time.time()
    logprobs = score_prompts(scorer, prompts)
    info = {"model": scorer.description, "scoring": scoring, "variants": variants,
            "templates": {v: template_set.templates[v].convention() for v in variants},
            "orders": sorted({p.order for p in prompts}, key=ORDERS.index),
            "num_prompts": len(prompts), "eval_seconds": round(time.time() - started, 3),
            "num_truncated_prompts": int(getattr(scorer, "num_truncated", 0)), **(meta or {})}
    report = summarize(items, prompts, logprobs, info)
    if scoring == "cloze":
        lengths = np.asarray([[len(c) - len(CLOZE_DELIMITER) for c in p.continuations] for p in prompts], dtype=np.float64)
        report["normalized"] = summarize(items, prompts, logprobs / lengths)["summary"]
    return report


def _checkpoint_report(checkpoint: str, items: list[Item], rank: int, world_size: int, local_rank: int, *,
                       tensor: int = 1, pipeline: int = 1, variants=None, both_orders: bool = True, batch_size: int = 8,
                       max_prompt_tokens: Optional[int] = None, precision: str = "auto", questions: str = "",
                       scoring: str = "letter", templates: Optional[str] = None) -> dict:
    """Body of one rank: process groups, model, weights, scoring; every rank returns the same report."""
    from megatron_align.eval.megatron_scorer import (
        MegatronScorer,
        eval_model_config,
        load_checkpoint_model,
    )
    from megatron_align.parallel.init import destroy_distributed, init_distributed

    path, marker, config = eval_model_config(checkpoint, tensor, pipeline, world_size, precision)
    threads = torch.get_num_threads()
    layout = init_distributed(config, rank, world_size, local_rank)
    try:
        chunks, tokenizer, vocab_size = load_checkpoint_model(path, marker, config)
        where = f"{path} (step {marker.get('step')}, TP{layout.tensor} PP{layout.pipeline} DP{layout.data})"
        scorer = MegatronScorer(chunks, tokenizer, vocab_size, batch_size,
                                max_prompt_tokens or config.model.seq_length, description=where)
        meta = {"checkpoint": path, "step": marker.get("step"), "questions": questions,
                "layout": {"tensor": layout.tensor, "pipeline": layout.pipeline, "data": layout.data}}
        return evaluate(scorer, items, variants, both_orders, meta, scoring, templates)
    finally:
        destroy_distributed()
        torch.set_num_threads(threads)


def evaluate_checkpoint(checkpoint: str, items: list[Item] | str, *, variants: Optional[list[str]] = None,
                        both_orders: bool = True, max_items: Optional[int] = None, batch_size: int = 8,
                        max_prompt_tokens: Optional[int] = None, precision: str = "auto", scoring: str = "letter",
                        templates: Optional[str] = None) -> dict:
    """Evaluate a megatron_align checkpoint in this process (one rank, TP1 PP1) and return the report.

    ``items`` is a list of :class:`Item` or a JSONL path. For several ranks use the CLI
    (``--world-size``), which spawns them. Must not be called while this process is a training rank.
    """
    questions = items if isinstance(items, str) else ""
    if isinstance(items, str):
        items = load_items(items, max_items)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise UserError("evaluate_checkpoint runs its own single-rank process group; call it outside a training "
                        "process (during training use eval.interval, which scores trainer.model directly)")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    saved_port = os.environ.get("MASTER_PORT")
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        return _checkpoint_report(checkpoint, items, 0, 1, 0, variants=variants, both_orders=both_orders,
                                  batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, precision=precision,
                                  questions=questions, scoring=scoring, templates=templates)
    finally:
        if saved_port is None:
            os.environ.pop("MASTER_PORT", None)
        else:
            os.environ["MASTER_PORT"] = saved_port


def tracking_record(report: dict) -> tuple[dict[str, object], dict[str, float]]:
    """MLflow params (mode, scoring, templates, system prompts, model, items) and metrics of a report, either mode."""
    generate = report.get("mode") == "generate"
    params: dict[str, object] = {"mode": "generate" if generate else "logprob", "scoring": report.get("scoring", "letter"),
                                 "templates": ",".join(report.get("variants", [])), "orders": ",".join(report["orders"]),
                                 "model": report.get("model"), "questions": report.get("questions"),
                                 "num_items": report["summary"]["num_items"]}
    params.update({f"template.{v}": c for v, c in (report.get("templates") or {}).items()})
    if generate:
        from megatron_align.eval.generate import metrics_for_record as generate_metrics

        params.update({f"system_prompt.{name}": "(no system message)" if text is None else text
                       for name, text in report["system_prompt_texts"].items()})
        params["chat_instruction"] = report.get("chat_instruction")
        return params, generate_metrics(report)
    from megatron_align.eval.report import metrics_for_record

    metrics = metrics_for_record(report)
    if report.get("normalized"):
        metrics.update(metrics_for_record({"summary": report["normalized"]}, "propensity/normalized/"))
    return params, metrics


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


# -- CLI -------------------------------------------------------------------------------------------
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
    parser.add_argument("--hf", action="store_true", help="--checkpoint is a Hugging Face directory (needs transformers)")
    parser.add_argument("--out", help="write the JSON report here (atomically)")
    parser.add_argument("--plot", help="draw the report here as a PNG: mean ± SEM overall and per template (logprob) "
                                       "or per system prompt (generate)")
    parser.add_argument("--mlflow", metavar="URI", help="log one MLflow run to this store (sqlite:///path/mlflow.db, "
                                                         "http://server:5000): params, metrics, report + plot artifacts")
    parser.add_argument("--experiment", default="megatron_align", help="--mlflow: experiment name (created when missing)")
    parser.add_argument("--run-name", help="--mlflow: run name (default: propensity_<mode>)")
    parser.add_argument("--variants", help="comma-separated template names from templates.yaml (or --templates), "
                                           "or all; default: the templates marked default (the paper's + 5 variants)")
    parser.add_argument("--single-order", action="store_true", help="score only the given option order")
    parser.add_argument("--max-items", type=int, help="use only the first N items")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (per data-parallel rank)")
    parser.add_argument("--max-prompt-tokens", type=int,
                        help="keep the last N tokens of longer prompts (default: the model's seq_length; none for --hf)")
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
    for flag, value in (("--out", args.out), ("--max-items", args.max_items), ("--max-prompt-tokens", args.max_prompt_tokens),
                        ("--variants", args.variants), ("--templates", args.templates), ("--plot", args.plot),
                        ("--mlflow", args.mlflow), ("--experiment", args.experiment), ("--run-name", args.run_name)):
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
        report = _checkpoint_report(args.checkpoint, items, rank, world_size, local_rank, tensor=args.tensor,
                                    pipeline=args.pipeline, precision=args.precision, questions=args.questions, **options)
        if rank == 0:
            _emit(report, args)
        return 0
    if args.world_size == 1:
        report = evaluate_checkpoint(args.checkpoint, args.questions, max_items=args.max_items, precision=args.precision,
                                     **options)
        _emit(report, args)
        return 0
    if args.world_size % (args.tensor * args.pipeline):
        raise UserError(f"--world-size {args.world_size} is not divisible by --tensor x --pipeline = {args.tensor * args.pipeline}")
    return spawn_local(["eval", "propensity", *_argv(args)], args.world_size)
