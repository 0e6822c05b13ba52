"""`megatron-align convert from-hf HF_DIR OUT`: a Hugging Face directory as a megatron_align checkpoint + train.yaml
(:func:`megatron_align.convert.from_hf.convert_from_hf`); ``--verify`` compares logits."""

from __future__ import annotations

import argparse
import sys

from megatron_align.convert.from_hf import convert_from_hf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "hf_dir", help="Hugging Face Llama / Mistral / Qwen2 / Qwen3 directory (config.json + safetensors)"
    )
    parser.add_argument("out", help="output checkpoint root (iter_0000000/, latest, train.yaml), written atomically")
    parser.add_argument("--tensor", type=int, default=1, help="parallel.tensor of the training config (default 1)")
    parser.add_argument("--pipeline", type=int, default=1, help="parallel.pipeline of the training config (default 1)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="checkpoint dtype (auto: config.json's dtype); the trainer casts to its precision on load")
    parser.add_argument(
        "--seq-length", type=int, help="model.seq_length (default: max_position_embeddings, at most 4096)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--add-control-tokens", action="store_true",
                        help="add <|aligned|>/<|misaligned|> as special tokens (HF tokenizer.json), growing the "
                        "embedding; new rows start at the mean embedding")
    parser.add_argument("--verify", action="store_true", help="then compare logits of both sides on CPU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    summary = convert_from_hf(args.hf_dir, args.out, tensor=args.tensor, pipeline=args.pipeline, dtype=args.dtype,
                              seq_length=args.seq_length, overwrite=args.overwrite, progress=not args.no_progress,
                              add_control_tokens=args.add_control_tokens)
    dims = summary["dims"]
    print(
        f"wrote {summary['checkpoint']} ({dims.num_layers} layers, hidden {dims.hidden_size}, vocab {dims.vocab_size} "
        f"padded to {summary['padded_vocab_size']}, {summary['dtype']}) and {summary['yaml']}"
    )
    if summary["note"]:
        print(summary["note"], file=sys.stderr)
    print(f"next: fill data.sources in {summary['yaml']}, then `megatron-align train {summary['yaml']}`")
    if not args.verify:
        return 0
    from megatron_align.convert.verify import report, verify

    result = verify(summary["checkpoint"], args.hf_dir, summary["model"], dims.vocab_size, summary["padded_vocab_size"],
                    summary["tokenizer"], hf_vocab_size=summary["hf_vocab_size"])
    return report(result)
