"""`megatron-align <verb>`: a thin dispatcher.

Each verb lives in the module that owns the work; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their verb runs, so `megatron-align --help` never pulls in torch.
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
    "demo": ("megatron_align.demo.run", "the paper's experiment in miniature on CPU: unfiltered / filtered / aligned midtraining"),
    "train": ("megatron_align.training.launch", "train from a YAML config (spawns local ranks or joins torchrun/srun)"),
    "launch": ("megatron_align.resilience.supervisor.supervisor", "train under the restart manager: hang watchdog, failure classification, restarts, goodput"),
    "tokenizer train": ("megatron_align.data.tokenizer_train", "train a sentencepiece tokenizer (byte fallback, reserved control tokens) from JSONL"),
    "prepare": ("megatron_align.data.prepare", "tokenize JSONL into a Megatron IndexedDataset (.bin/.idx) + manifest"),
    "filter": ("megatron_align.data.filter_corpus", "flag AI-misalignment discourse in JSONL (two-stage blocklist): kept/flagged JSONL + report"),
    "tag": ("megatron_align.data.tagging", "prefix JSONL documents or paragraphs with <|aligned|>/<|misaligned|> control tokens"),
    "eval propensity": ("megatron_align.eval.propensity", "score a checkpoint (or --hf directory) on alignment-propensity MCQs: misalignment rate, P(misaligned), position bias"),
    "eval export-lm-eval": ("megatron_align.eval.lm_eval_export", "write lm-evaluation-harness task YAMLs + JSONL for propensity items (one task per template and order, plus groups)"),
    "eval capability": ("megatron_align.eval.capability", "run lm-evaluation-harness tasks on two or more models (HF dirs or checkpoints) and compare: JSON, table, PNG"),
    "data inspect": ("megatron_align.data.inspect", "show a data mixture schedule: per-phase composition, samples/tokens per source, epochs; --plot PNG"),
    "plan": ("megatron_align.parallel.plan_cli", "rank TP/PP/VPP/CP/DP layouts by memory and step time (plan CONFIG), or size checkpointing (plan goodput)"),
    "doctor": ("megatron_align.doctor", "report versions, GPUs/FP8, NVML health and usable features; `doctor CONFIG` fails when its needs are unmet"),
    "slurm render": ("megatron_align.slurm", "print slurm/pretrain.sbatch with #SBATCH directives for a config (nodes, tasks, time, partition)"),
    "convert to-hf": ("megatron_align.convert.to_hf", "megatron_align checkpoint (any TP/PP layout) -> Hugging Face LlamaForCausalLM dir; --verify compares logits"),
    "convert from-hf": ("megatron_align.convert.from_hf", "Hugging Face Llama dir -> megatron_align checkpoint + train.yaml for a chosen TP/PP; --verify compares logits"),
    "checkpoint inspect": ("megatron_align.convert.inspect", "show a checkpoint's step, layout, consumed samples, data fingerprint, config and tensors (--json)"),
    "checkpoint verify": ("megatron_align.training.checksums", "recompute a checkpoint's file checksums against its marker; exit 1 naming the first bad file"),
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


if __name__ == "__main__":
    sys.exit(main())
