"""`megatron-align tag`: arguments and printing; the work is :func:`megatron_align.corpus.tag.tag_corpus` (or, with
``--executor``, :func:`~megatron_align.corpus.tag.tag_job` on the pipeline runner)."""

from __future__ import annotations

import argparse
import json

from megatron_align.cli import _corpus_options as options
from megatron_align.config.corpus import TaggingConfig
from megatron_align.corpus.pipeline import run_pipeline
from megatron_align.corpus.tag import filter_for, tag_corpus, tag_job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TaggingConfig()
    options.add_inputs(parser)
    parser.add_argument("--output", required=True, help="tagged JSONL (.jsonl or .jsonl.gz)")
    parser.add_argument(
        "--score-field", default=None, help="label from this numeric field (else: from the filter's verdict)"
    )
    parser.add_argument(
        "--threshold", type=float, default=d.threshold, help="score >= threshold is misaligned (default: %(default)s)"
    )
    parser.add_argument(
        "--lower-is-misaligned", action="store_true", help="score < threshold is misaligned (an alignment score)"
    )
    parser.add_argument("--segments", action="store_true", help="tag each paragraph instead of each document")
    parser.add_argument("--untagged-fraction", type=float, default=d.untagged_fraction, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the untagged choice (default: %(default)s)")
    parser.add_argument("--text-field", default=d.text_field, help="(default: %(default)s)")
    parser.add_argument(
        "--id-field", default=None, help="stable document id for the untagged choice (default: text hash)"
    )
    parser.add_argument(
        "--terms-dir", default=None, help="filter term lists overlaying the defaults (label from the filter)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first bad line (file:line) instead of skipping it"
    )
    parser.add_argument("--workers", type=int, default=-1, help="with --executor: tasks at once (default all)")
    options.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = TaggingConfig(
        source="score" if args.score_field else "filter",
        score_field=args.score_field or "score",
        threshold=args.threshold,
        higher_is_misaligned=not args.lower_is_misaligned,
        granularity="segment" if args.segments else "document",
        untagged_fraction=args.untagged_fraction,
        seed=args.seed,
        text_field=args.text_field,
        id_field=args.id_field,
    )
    if args.executor != "none":
        summary = run_pipeline(tag_job(config, args.output, args.terms_dir, args.strict), args.inputs,
                               options.config_from_args(args, args.workers), args.output + ".work")
        if summary.get("submitted"):
            options.report_submitted(summary)
            return 0
    else:
        summary = tag_corpus(args.inputs, args.output, config, filter_for(config, args.terms_dir), strict=args.strict,
                             progress=args.progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped_lines"}))
    return 0
