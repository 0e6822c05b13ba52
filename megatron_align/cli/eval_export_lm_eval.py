"""`megatron-align eval export-lm-eval ITEMS OUT_DIR`: the propensity items as lm-evaluation-harness tasks
(:func:`megatron_align.eval.lm_eval_export.export`)."""

from __future__ import annotations

import argparse
import os

from megatron_align.eval.lm_eval_export import export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", help="JSONL items (the eval propensity schema)")
    parser.add_argument("out_dir", help="directory for the task YAMLs and JSONL (lm_eval --include_path OUT_DIR)")
    parser.add_argument("--variants", help="template names (default: the default set; 'all' for every template)")
    parser.add_argument("--templates", help="YAML file of extra/overriding templates")
    parser.add_argument("--prefix", default="ma_propensity", help="task/group name prefix")
    parser.add_argument("--max-items", type=int, help="only the first N items")


def run(args: argparse.Namespace) -> int:
    manifest = export(args.items, args.out_dir, args.variants, args.templates, args.prefix, args.max_items)
    for group, tasks in manifest["groups"].items():
        print(f"group {group}: {len(tasks)} tasks")
    print(f"wrote {os.path.abspath(args.out_dir)}; run: HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args "
          f"pretrained=DIR --include_path {os.path.abspath(args.out_dir)} --tasks {args.prefix}")
    return 0
