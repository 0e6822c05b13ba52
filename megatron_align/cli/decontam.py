"""`megatron-align decontam INPUT... --items [SPLIT=]ITEMS.jsonl --out-dir DIR`: n-gram decontamination.

Exit status: 0 clean (or only non-held-out hits, dropped); 1 a document matched a held-out split (the report and
outputs are written first; ``--drop-held-out-and-continue`` drops them and exits 0); 2 a usage or input error.
``--executor slurm`` returns once the jobs are submitted: the merge job writes the same outputs, and a held-out hit
is in its report.json (``held_out_documents``).
"""

from __future__ import annotations

import argparse

from megatron_align.cli import _corpus_options as options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_inputs(parser)
    parser.add_argument("--items", action="append", required=True, metavar="[SPLIT=]ITEMS.jsonl",
                        help="propensity items (repeatable); an item's split is its `split` field, else SPLIT=, "
                             "else the file name")
    parser.add_argument("--out-dir", required=True, help="writes kept.jsonl, contaminated.jsonl, report.json")
    parser.add_argument("--held-out", action="append", default=[], metavar="SPLIT",
                        help="zero-tolerance split (repeatable): a hit exits 1 after the report is written")
    parser.add_argument("--drop-held-out-and-continue", action="store_true",
                        help="drop held-out hits like any other and exit 0")
    parser.add_argument("--ngram", type=int, default=13, help="words per n-gram (default 13; ~8 for synthetic text)")
    parser.add_argument("--min-words", type=int, default=5,
                        help="index a question/option shorter than --ngram whole when it has this many words")
    parser.add_argument("--report-only", action="store_true", help="write report.json only")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--workers", type=int, default=None,
                        help="matching processes (default 1; output identical at any count); with --executor: "
                             "tasks at once (default all)")
    options.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from megatron_align.errors import UserError
    from megatron_align.synth.decontam_corpus import (
        DecontamConfig,
        decontam_job,
        exit_status,
        job_index,
        run_decontam,
        summary,
    )

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be >= 1")
    workers = args.workers or 1
    config = DecontamConfig(ngram=args.ngram, min_words=args.min_words, held_out=tuple(args.held_out),
                            continue_on_held_out=args.drop_held_out_and_continue, report_only=args.report_only,
                            text_field=args.text_field, workers=workers if args.executor == "none" else 1)
    if args.executor != "none":
        from megatron_align.corpus.pipeline import run_pipeline

        job = decontam_job(args.items, args.out_dir, config)
        job_index(job.params)  # bad items or a misspelt --held-out fail here, before any task starts
        pc = options.config_from_args(args, -1 if args.workers is None else args.workers)
        report = run_pipeline(job, args.inputs, pc, args.out_dir.rstrip("/") + ".work")
        if report.get("submitted"):
            options.report_submitted(report)
            return 0
        status = exit_status(report, config)
    else:
        report, status = run_decontam(args.inputs, args.items, args.out_dir, config)
    print(summary(report))
    if status:
        print(f"decontam: {report['held_out_documents']:,} documents match held-out split(s) "
              f"{', '.join(config.held_out)}; see {args.out_dir}/report.json (exit {status})")
    return status
