"""`megatron-align prepare`: arguments and printing; the work is :func:`megatron_align.corpus.prepare.prepare_source`
(or, with ``--executor``, :func:`~megatron_align.corpus.prepare.prepare_job` on the pipeline runner)."""

from __future__ import annotations

import argparse
import sys

from megatron_align.cli import _corpus_options as options
from megatron_align.config.corpus import DEFAULT_CONTROL_TOKENS
from megatron_align.corpus.pipeline import run_pipeline
from megatron_align.corpus.prepare import prepare_job, prepare_source, tokenizer_config_from_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_inputs(parser, "; one source")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.manifest.json/.skipped.jsonl")
    parser.add_argument(
        "--source-name", default=None, help="name of the source in the manifest (default: prefix basename)"
    )
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="`byte`, a sentencepiece PATH.model, or a Hugging Face model DIR / "
        "tokenizer.json (the model's own tokenizer; BOS/EOS as the model does) (default: byte)",
    )
    parser.add_argument("--control-tokens", default=None,
                        help=f"comma-separated reserved control tokens (default: {','.join(DEFAULT_CONTROL_TOKENS)}; "
                        "none for an HF tokenizer: pass the training config's data.tokenizer.control_tokens)")
    parser.add_argument("--text-field", default="text", help="JSON key holding the document text (default: text)")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizer processes (default 1); with --executor: tasks at once (default all). "
                             "Output is identical for any count")
    parser.add_argument("--strict", action="store_true", help="fail on the first unusable line, writing nothing")
    parser.add_argument("--allow-misaligned", action="store_true",
                        help="accept synthetic documents labelled stance=misaligned (refused by default)")
    options.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from megatron_align.synth.stance import refuse_misaligned

    refuse_misaligned(args.inputs, args.allow_misaligned, args.text_field)
    tokenizer_config = tokenizer_config_from_arg(args.tokenizer, args.control_tokens)
    if args.executor != "none":
        job = prepare_job(tokenizer_config, args.output_prefix, args.text_field, args.strict, args.source_name)
        config = options.config_from_args(args, -1 if args.workers is None else args.workers)
        manifest = run_pipeline(job, args.inputs, config, args.output_prefix + ".work")
        if manifest.get("submitted"):
            options.report_submitted(manifest)
            return 0
    else:
        manifest = prepare_source(
            args.inputs,
            args.output_prefix,
            tokenizer_config,
            text_field=args.text_field,
            workers=1 if args.workers is None else args.workers,
            strict=args.strict,
            source_name=args.source_name,
            progress=args.progress,
        )
    print(f"{manifest['source_name']}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
          f"({manifest['dtype']}) -> {args.output_prefix}.bin/.idx; tokenizer {manifest['tokenizer']['identity']}")
    if manifest["skipped_total"]:
        counts = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items() if v)
        print(
            f"skipped {manifest['skipped_total']:,} lines ({counts}); "
            f"all listed in {args.output_prefix}.skipped.jsonl:",
            file=sys.stderr,
        )
        for example in manifest["skipped_examples"]:
            print(f"  {example}", file=sys.stderr)
    return 0
