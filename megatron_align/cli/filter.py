"""`megatron-align filter`: arguments and printing; the work is :func:`megatron_align.corpus.filter.filter_corpus`
(or, with ``--executor``, :func:`~megatron_align.corpus.filter.filter_job` on the pipeline runner)."""

from __future__ import annotations

import argparse

from megatron_align.cli import _corpus_options as options
from megatron_align.config.corpus import FilterConfig
from megatron_align.corpus.filter import filter_corpus, filter_job
from megatron_align.corpus.pipeline import run_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = FilterConfig()
    options.add_inputs(parser)
    parser.add_argument("--out-dir", required=True, help="writes kept.jsonl, flagged.jsonl and report.json here")
    parser.add_argument(
        "--text-field", default=defaults.text_field, help="JSON field holding the document text (default: %(default)s)"
    )
    parser.add_argument(
        "--policy",
        choices=["drop", "resample"],
        default=defaults.policy,
        help="drop flagged documents, or resample kept ones in their place to keep the count (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the resampling draw (default: %(default)s)"
    )
    parser.add_argument(
        "--terms-dir", default=None, help="directory of <category>.yaml term lists overlaying the defaults"
    )
    parser.add_argument(
        "--classifier",
        default=defaults.classifier,
        help="second stage on blocklist hits: none | term_density | module:callable (default: %(default)s)",
    )
    parser.add_argument("--classifier-threshold", type=float, default=defaults.classifier_threshold,
                        help="hits scoring below this are kept (default: %(default)s)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"matching processes (default: {defaults.workers}); with --executor: tasks at once (default all)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first bad input line (file:line) instead of skipping it"
    )
    parser.add_argument("--compress", action="store_true", help="write kept/flagged as .jsonl.gz")
    options.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = FilterConfig(
        text_field=args.text_field,
        policy=args.policy,
        seed=args.seed,
        terms_dir=args.terms_dir,
        classifier=args.classifier,
        classifier_threshold=args.classifier_threshold,
        workers=1 if args.executor != "none" else (FilterConfig().workers if args.workers is None else args.workers),
        strict=args.strict,
    )
    if args.executor != "none":
        pc = options.config_from_args(args, -1 if args.workers is None else args.workers)
        report = run_pipeline(filter_job(config, args.out_dir, args.compress), args.inputs, pc,
                              args.out_dir.rstrip("/") + ".work")
        if report.get("submitted"):
            options.report_submitted(report)
            return 0
    else:
        report = filter_corpus(args.inputs, args.out_dir, config, compress=args.compress, progress=args.progress)
    print(
        f"{report['documents']} documents, {report['flagged']} flagged ({100 * report['flag_rate']:.2f}%), "
        f"{report['skipped']['total']} bad lines skipped; "
        f"{report['output_documents']} written to {report['outputs']['kept']}; "
        f"report: {report['outputs']['report']}"
    )
    return 0
