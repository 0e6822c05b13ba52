"""Alignment-propensity evaluation: the Python API behind `megatron-align eval propensity`.

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

import time

import numpy as np
import torch

from megatron_align.errors import UserError
from megatron_align.eval.items import ORDERS, Item, Prompt, build_prompts, load_items
from megatron_align.eval.report import summarize
from megatron_align.eval.templates import CLOZE_DELIMITER, load_templates
from megatron_align.parallel.spawn import local_rendezvous


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


def evaluate(scorer, items: list[Item], variants: list[str] | None = None, both_orders: bool = True,
             meta: dict | None = None, scoring: str = "letter", templates: str | None = None) -> dict:
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
        lengths = np.asarray(
            [[len(c) - len(CLOZE_DELIMITER) for c in p.continuations] for p in prompts], dtype=np.float64
        )
        report["normalized"] = summarize(items, prompts, logprobs / lengths)["summary"]
    return report


def evaluate_checkpoint_on_rank(checkpoint: str, items: list[Item], rank: int, world_size: int, local_rank: int, *,
                       tensor: int = 1, pipeline: int = 1, variants=None, both_orders: bool = True, batch_size: int = 8,
                       max_prompt_tokens: int | None = None, precision: str = "auto", questions: str = "",
                       scoring: str = "letter", templates: str | None = None) -> dict:
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


def evaluate_checkpoint(checkpoint: str, items: list[Item] | str, *, variants: list[str] | None = None,
                        both_orders: bool = True, max_items: int | None = None, batch_size: int = 8,
                        max_prompt_tokens: int | None = None, precision: str = "auto", scoring: str = "letter",
                        templates: str | None = None) -> dict:
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
    with local_rendezvous():
        return evaluate_checkpoint_on_rank(checkpoint, items, 0, 1, 0, variants=variants, both_orders=both_orders,
                                           batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                                           precision=precision, questions=questions, scoring=scoring,
                                           templates=templates)


def tracking_record(report: dict) -> tuple[dict[str, object], dict[str, float]]:
    """MLflow params (mode, scoring, templates, system prompts, model, items) and metrics of a report, either mode."""
    generate = report.get("mode") == "generate"
    params: dict[str, object] = {
        "mode": "generate" if generate else "logprob",
        "scoring": report.get("scoring", "letter"),
        "templates": ",".join(report.get("variants", [])),
        "orders": ",".join(report["orders"]),
        "model": report.get("model"),
        "questions": report.get("questions"),
        "num_items": report["summary"]["num_items"],
    }
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
