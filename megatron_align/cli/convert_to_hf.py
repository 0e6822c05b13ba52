"""`megatron-align convert to-hf CHECKPOINT OUT`: a megatron_align checkpoint (any TP/PP layout) as a Hugging Face
directory (:func:`megatron_align.convert.to_hf.convert_to_hf`); ``--verify`` compares logits."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from megatron_align.convert import families
from megatron_align.convert.to_hf import convert_to_hf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run's checkpoints/ dir (newest complete is used) or one iter_XXXXXXX dir")
    parser.add_argument("out", help="output Hugging Face directory (written atomically)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="tensor dtype of the safetensors (auto: as saved)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    parser.add_argument(
        "--tokenizer-model", help="the run's sentencepiece .model or HF tokenizer directory when its saved path moved"
    )
    parser.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files (needs --vocab-size)")
    parser.add_argument("--vocab-size", type=int, help="override the real vocabulary size (trims TP padding rows)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--verify", action="store_true", help="then compare logits of both sides on CPU (needs transformers)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    summary = convert_to_hf(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        tokenizer_model=args.tokenizer_model,
        with_tokenizer=not args.no_tokenizer,
        vocab_size=args.vocab_size,
        progress=not args.no_progress,
    )
    dims = summary["dims"]
    print(
        f"wrote {summary['out']}: {families.BY_NAME[summary['model'].hf_family].architecture}, "
        f"{dims.num_layers} layers, hidden {dims.hidden_size}, vocab "
        f"{summary['vocab_size']} (padded {summary['padded_vocab_size']} in the checkpoint), {summary['dtype']}, "
        f"from {summary['checkpoint']} (step {summary['step']})"
    )
    for note in summary["notes"]:
        print(note, file=sys.stderr)
    if not args.verify:
        return 0
    from megatron_align.convert.verify import report, verify

    result = verify(summary["checkpoint"], summary["out"], asdict(summary["model"]), summary["vocab_size"],
                    summary["padded_vocab_size"], summary["tokenizer"])
    return report(result)
