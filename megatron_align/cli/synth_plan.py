"""`megatron-align synth plan TAXONOMY.yaml`: expand a taxonomy into prompts, print cells and a token budget."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("taxonomy", help="taxonomy YAML (see examples/synth/taxonomy.yaml)")
    parser.add_argument("--out-dir", default=None, help="write prompts.jsonl and plan.json here")
    parser.add_argument("--allow-misaligned", action="store_true",
                        help="allow stance: misaligned (documents depicting misaligned AI, labelled as such)")


def run(args: argparse.Namespace) -> int:
    from megatron_align.synth.plan import expand, summary, write_plan
    from megatron_align.synth.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(args.taxonomy, allow_misaligned=args.allow_misaligned)
    prompts = expand(taxonomy)
    print(summary(taxonomy, prompts))
    if args.out_dir:
        write_plan(args.out_dir, taxonomy, prompts)
        print(f"wrote {len(prompts):,} prompts to {args.out_dir}/prompts.jsonl")
    return 0
