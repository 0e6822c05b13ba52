"""`megatron-align tokenizer train`: arguments and printing; the work is
:func:`megatron_align.corpus.tokenizer_train.train_tokenizer`."""

from __future__ import annotations

import argparse

from megatron_align.cli import _corpus_options as options
from megatron_align.config.corpus import NORMALIZATIONS, TokenizerTrainConfig
from megatron_align.corpus.tokenizer_train import train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TokenizerTrainConfig()
    options.add_inputs(parser)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--model-type", default=defaults.model_type, choices=("bpe", "unigram"))
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--character-coverage", type=float, default=defaults.character_coverage)
    parser.add_argument("--text-field", default=defaults.text_field, help="JSON key holding the text")
    parser.add_argument("--max-sentences", type=int, default=defaults.max_sentences,
                        help="lines sampled for training (reservoir over all inputs; 0 = all)")
    parser.add_argument("--max-sentence-length", type=int, default=defaults.max_sentence_length,
                        help="longer lines (bytes) are left out of training")
    parser.add_argument("--control-tokens", default=",".join(defaults.control_tokens),
                        help="comma-separated reserved control tokens (user-defined symbols)")
    parser.add_argument("--normalization", default=defaults.normalization, choices=NORMALIZATIONS)
    parser.add_argument("--num-threads", type=int, default=defaults.num_threads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")


def run(args: argparse.Namespace) -> int:
    config = TokenizerTrainConfig(
        model_type=args.model_type, vocab_size=args.vocab_size, character_coverage=args.character_coverage,
        text_field=args.text_field, max_sentences=args.max_sentences, max_sentence_length=args.max_sentence_length,
        control_tokens=[t for t in args.control_tokens.split(",") if t], normalization=args.normalization,
        num_threads=args.num_threads, seed=args.seed)
    summary = train_tokenizer(args.inputs, args.output_prefix, config, verbose=args.verbose)
    print(f"{summary['model']}: {summary['vocab_size']:,} pieces from {summary['sentences']:,} lines of "
          f"{summary['documents']:,} documents; control tokens {summary['control_tokens']}")
    print(f"identity {summary['identity']}")
    return 0
