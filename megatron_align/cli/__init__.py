"""`megatron-align <verb>`: a thin dispatcher.

Each verb's module exposes ``add_arguments(parser)`` and ``run(args) -> int``: it parses
arguments, calls library functions (which tests call directly) and prints. Those modules are
``megatron_align/cli/<verb>.py`` (the corpus and ``launch`` verbs still live beside their code).
Modules are imported only when their verb runs, so `megatron-align --help` never pulls in torch.
Nested verbs (``tokenizer train``, ``data inspect``) use a space-separated key.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from megatron_align.errors import UserError

# verb -> (module, one-line help). Add a verb by adding one row.
VERBS: dict[str, tuple[str, str]] = {
    "demo": (
        "megatron_align.cli.demo",
        "the paper's experiment in miniature on CPU: unfiltered / filtered / aligned midtraining",
    ),
    "train": ("megatron_align.cli.train", "train from a YAML config (spawns local ranks or joins torchrun/srun)"),
    "launch": (
        "megatron_align.cli.launch",
        "train under the restart manager: hang watchdog, failure classification, restarts, goodput",
    ),
    "tokenizer train": (
        "megatron_align.cli.tokenizer_train",
        "train a sentencepiece tokenizer (byte fallback, reserved control tokens) from JSONL",
    ),
    "prepare": ("megatron_align.cli.prepare", "tokenize JSONL into a Megatron IndexedDataset (.bin/.idx) + manifest"),
    "filter": (
        "megatron_align.cli.filter",
        "flag AI-misalignment discourse in JSONL (two-stage blocklist): kept/flagged JSONL + report",
    ),
    "synth plan": (
        "megatron_align.cli.synth_plan",
        "expand a synthetic-document taxonomy into prompts (deterministic ids): cells and token budget",
    ),
    "synth generate": (
        "megatron_align.cli.synth_generate",
        "generate synthetic aligned-AI documents from a taxonomy against an OpenAI-compatible server (resumable), "
        "quality-filtered, deduplicated, decontaminated",
    ),
    "decontam": (
        "megatron_align.cli.decontam",
        "n-gram decontamination of a corpus against propensity items: kept/contaminated JSONL + report per split",
    ),
    "tag": (
        "megatron_align.cli.tag",
        "prefix JSONL documents or paragraphs with <|aligned|>/<|misaligned|> control tokens",
    ),
    "eval propensity": (
        "megatron_align.cli.eval_propensity",
        "score a checkpoint (or --hf directory) on alignment-propensity MCQs: "
        "misalignment rate, P(misaligned), position bias",
    ),
    "eval export-lm-eval": (
        "megatron_align.cli.eval_export_lm_eval",
        "write lm-evaluation-harness task YAMLs + JSONL for propensity items "
        "(one task per template and order, plus groups)",
    ),
    "eval capability": (
        "megatron_align.cli.eval_capability",
        "run lm-evaluation-harness tasks on two or more models (HF dirs or checkpoints) and compare: JSON, table, PNG",
    ),
    "data inspect": (
        "megatron_align.cli.data_inspect",
        "show a data mixture schedule: per-phase composition, samples/tokens per source, epochs; --plot PNG",
    ),
    "plan": (
        "megatron_align.cli.plan",
        "rank TP/PP/VPP/CP/DP layouts by memory and step time (plan CONFIG), or size checkpointing (plan goodput)",
    ),
    "doctor": (
        "megatron_align.cli.doctor",
        "report versions, GPUs/FP8, NVML health and usable features; `doctor CONFIG` fails when its needs are unmet",
    ),
    "slurm render": (
        "megatron_align.cli.slurm_render",
        "print slurm/pretrain.sbatch with #SBATCH directives for a config (nodes, tasks, time, partition)",
    ),
    "convert to-hf": (
        "megatron_align.cli.convert_to_hf",
        "megatron_align checkpoint (any TP/PP layout) -> Hugging Face LlamaForCausalLM dir; --verify compares logits",
    ),
    "convert from-hf": (
        "megatron_align.cli.convert_from_hf",
        "Hugging Face Llama dir -> megatron_align checkpoint + train.yaml for a chosen TP/PP; --verify compares logits",
    ),
    "checkpoint inspect": (
        "megatron_align.cli.checkpoint_inspect",
        "show a checkpoint's step, layout, consumed samples, data fingerprint, config and tensors (--json)",
    ),
    "profile summarize": (
        "megatron_align.cli.profile_summarize",
        "per-rank compute / communication / data / optimizer / idle seconds per step from RUN_DIR/profile traces",
    ),
    "checkpoint verify": (
        "megatron_align.cli.checkpoint_verify",
        "recompute a checkpoint's file checksums against its marker; exit 1 naming the first bad file",
    ),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-align", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (_module, help_text) in VERBS.items():
        words = name.split()
        if len(words) == 1:
            top.add_parser(name, help=help_text)
        else:
            if words[0] not in groups:
                group_parser = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group_parser.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)
            groups[words[0]].add_parser(words[1], help=help_text)
    return parser


def _quiet_optional_dependency_warnings() -> None:
    # Megatron-Core warns at import time for every absent optional fused kernel (apex, TE);
    # `megatron-align doctor` reports those once, clearly, instead.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\..*")


def _resolve_verb(argv: list[str]) -> list[str] | None:
    """The verb words at the front of argv ("train" or "tokenizer train"), or None if there are none."""
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in VERBS:
        return argv[:2]
    if argv and argv[0] in VERBS:
        return argv[:1]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _quiet_optional_dependency_warnings()
    words = _resolve_verb(argv)
    if words is None:
        _build_parser().parse_args(argv)  # prints help or a usage error naming the valid verbs
        return 2
    name = " ".join(words)
    module_name, help_text = VERBS[name]
    verb_parser = argparse.ArgumentParser(prog=f"megatron-align {name}", description=help_text)
    module = importlib.import_module(module_name)
    module.add_arguments(verb_parser)
    args = verb_parser.parse_args(argv[len(words):])
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"megatron-align {name}: error: {err}", file=sys.stderr)
        return 2

