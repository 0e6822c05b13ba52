"""`megatron-align eval capability --hf [LABEL=]DIR ... --out DIR`: lm-evaluation-harness tasks on two or more models,
compared (:func:`megatron_align.eval.capability.compare_models`)."""

from __future__ import annotations

import argparse
import os

from megatron_align.errors import UserError
from megatron_align.eval.capability import PAPER_TASKS, compare_models, format_table


def _models(args) -> list[tuple[str, str, bool]]:
    """(label, path, is_hf) from ``--hf [LABEL=]DIR`` and ``--checkpoint [LABEL=]DIR``, in command-line order."""
    out = []
    for spec, is_hf in args.models:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = os.path.basename(os.path.normpath(spec)), spec
        out.append((label, path, is_hf))
    labels = [m[0] for m in out]
    if len(set(labels)) != len(labels):
        raise UserError(f"model labels must be unique, got {labels}; name them with --hf LABEL=DIR")
    if not out:
        raise UserError(
            "give at least one model: --hf [LABEL=]DIR or --checkpoint [LABEL=]DIR (the first is the baseline)"
        )
    return out


class _Append(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.models = [*(getattr(namespace, "models", None) or []), (values, option_string == "--hf")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(models=[])
    parser.add_argument(
        "--hf", action=_Append, metavar="[LABEL=]DIR", help="a Hugging Face model directory (repeatable)"
    )
    parser.add_argument("--checkpoint", action=_Append, metavar="[LABEL=]DIR",
                        help="a megatron_align checkpoint, converted to HF in a temp dir (repeatable)")
    parser.add_argument("--tasks", default=",".join(PAPER_TASKS),
                        help=f"comma-separated lm-eval tasks (default: the paper's seven, {','.join(PAPER_TASKS)})")
    parser.add_argument("--include-path", help="directory of extra lm-eval task YAMLs (local tasks, offline)")
    parser.add_argument("--limit", type=int, help="only the first N documents per task (smoke runs)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--out", required=True, help="output directory: capability.json, capability.txt, capability.png"
    )


def run(args: argparse.Namespace) -> int:
    def print_scores(label: str, scores: dict) -> None:
        print(f"{label}: " + ", ".join(f"{t} {s['score']:.3f}" for t, s in scores.items()), flush=True)

    comparison = compare_models(
        _models(args), [t.strip() for t in args.tasks.split(",") if t.strip()], args.out,
        include_path=args.include_path, limit=args.limit, batch_size=args.batch_size, device=args.device,
        num_fewshot=args.num_fewshot, on_model=print_scores)
    print(format_table(comparison))
    print(f"wrote {args.out}/capability.json, capability.txt, capability.png")
    return 0
