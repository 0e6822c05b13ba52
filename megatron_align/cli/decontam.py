"""`megatron-align decontam INPUT... --items [SPLIT=]ITEMS.jsonl --out-dir DIR`: n-gram decontamination.

Exit status: 0 clean (or only non-held-out hits, dropped); 1 a document matched a held-out split (the report and
outputs are written first; ``--drop-held-out-and-continue`` drops them and exits 0); 2 a usage or input error.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="JSONL / JSONL.gz / .zst / Parquet files or directories")
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
    parser.add_argument("--workers", type=int, default=1, help="matching processes (output identical at any count)")


def run(args: argparse.Namespace) -> int:
    from megatron_align.errors import UserError
    from megatron_align.synth.decontam_corpus import DecontamConfig, run_decontam, summary

    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be >= 1")
    config = DecontamConfig(ngram=args.ngram, min_words=args.min_words, held_out=tuple(args.held_out),
                            continue_on_held_out=args.drop_held_out_and_continue, report_only=args.report_only,
                            text_field=args.text_field, workers=args.workers)
    report, status = run_decontam(args.inputs, args.items, args.out_dir, config)
    print(summary(report))
    if status:
        print(f"decontam: {report['held_out_documents']:,} documents match held-out split(s) "
              f"{', '.join(config.held_out)}; see {args.out_dir}/report.json (exit {status})")
    return status
