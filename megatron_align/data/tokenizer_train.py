"""`megatron-align tokenizer train`: a sentencepiece model from JSONL documents.

What: documents are read from JSONL (same reader and skip rules as
``prepare``), split into lines and streamed into sentencepiece's trainer,
which reservoir-samples at most ``max_sentences`` of them. The result is
``OUT.model`` (+ ``OUT.vocab``, one ``piece<TAB>score`` per id), loadable by
:class:`~megatron_align.data.tokenizer.SentencePieceTokenizer`.

Why these settings: ``byte_fallback`` means no text is ever ``<unk>``;
``identity`` normalisation without whitespace folding makes decode(encode(t))
== t, which pretraining data needs; the reserved control tokens
(``<|aligned|>`` ...) are user-defined symbols, so tagged text encodes each as
exactly one id; unk/bos/eos/pad get fixed ids 0..3 so EOD is ``</s>`` = 2.

The model bytes are the tokenizer's identity (a sha256 prefix), so the same
inputs and settings give the same identity on any machine: the thread count
is a fixed config value rather than the local core count, because
sentencepiece records it in the model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from megatron_align.data.sources import expand_inputs, iter_documents
from megatron_align.data.tokenizer import DEFAULT_CONTROL_TOKENS, SentencePieceTokenizer
from megatron_align.errors import ConfigError, UserError
from megatron_align.optional import require

NORMALIZATIONS = ("identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf")
_NUM_SPECIALS = 4  # <unk> <s> </s> <pad>
_NUM_BYTE_PIECES = 256  # byte_fallback reserves <0x00>..<0xFF>


@dataclass
class TokenizerTrainConfig:
    model_type: str = "bpe"
    """`bpe` or `unigram`."""
    vocab_size: int = 32000
    """Total pieces, including 4 specials, the control tokens and 256 byte-fallback pieces. Below 65,500 the
    prepared data is stored as uint16 (half the disk and page cache of int32)."""
    character_coverage: float = 0.9995
    """Fraction of characters covered by pieces; the rarest rest are spelled with byte pieces."""
    text_field: str = "text"
    """JSON key holding each document's text."""
    max_sentences: int = 2_000_000
    """At most this many lines (reservoir-sampled over all inputs) train the model; 0 = all."""
    max_sentence_length: int = 16384
    """Lines longer than this many bytes are left out of training (they still tokenize fine later)."""
    control_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_CONTROL_TOKENS))
    """Reserved control tokens (user-defined symbols): each always encodes as one id."""
    normalization: str = "identity"
    """sentencepiece normalisation rule; `identity` keeps decode(encode(text)) == text."""
    num_threads: int = 4
    """Trainer threads. Recorded in the model, so a fixed value keeps the identity machine-independent."""
    seed: int = 1234
    """Seed of sentencepiece's sentence sampling."""

    def __post_init__(self) -> None:
        key = "tokenizer_train"
        if self.model_type not in ("bpe", "unigram"):
            raise ConfigError(f"{key}.model_type={self.model_type!r}: expected 'bpe' or 'unigram'")
        if len(set(self.control_tokens)) != len(self.control_tokens) or not all(self.control_tokens):
            raise ConfigError(f"{key}.control_tokens={self.control_tokens!r}: must be distinct non-empty strings")
        smallest = _NUM_SPECIALS + len(self.control_tokens) + _NUM_BYTE_PIECES + 1
        if self.vocab_size < smallest:
            raise ConfigError(f"{key}.vocab_size={self.vocab_size}: must be >= {smallest} "
                              f"({_NUM_SPECIALS} specials + {len(self.control_tokens)} control tokens + "
                              f"{_NUM_BYTE_PIECES} byte pieces + at least one learned piece)")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"{key}.character_coverage={self.character_coverage}: must be in (0, 1]")
        if self.max_sentences < 0:
            raise ConfigError(f"{key}.max_sentences={self.max_sentences}: must be >= 0 (0 = no cap)")
        if self.max_sentence_length < 1:
            raise ConfigError(f"{key}.max_sentence_length={self.max_sentence_length}: must be >= 1")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"{key}.normalization={self.normalization!r}: expected one of {', '.join(NORMALIZATIONS)}")
        if self.num_threads < 1:
            raise ConfigError(f"{key}.num_threads={self.num_threads}: must be >= 1")
        if not self.text_field:
            raise ConfigError(f"{key}.text_field: must be a non-empty JSON key")


def _sentences(documents: Iterator[str], counts: dict[str, int], errors: list[Exception]) -> Iterator[str]:
    """Non-empty lines of the documents (sentencepiece trains on lines; newlines become byte pieces).

    An error while reading is kept in ``errors``: sentencepiece would flatten it into a RuntimeError.
    """
    try:
        for text in documents:
            counts["documents"] += 1
            for line in text.split("\n"):
                if line.strip():
                    counts["sentences"] += 1
                    yield line
    except Exception as err:
        errors.append(err)
        raise


def _output_prefix(output: str) -> str:
    return output[: -len(".model")] if output.endswith(".model") else output


def train_tokenizer(inputs: list[str] | str, output_prefix: str, config: TokenizerTrainConfig, *,
                    verbose: bool = False) -> dict:
    """Train, write ``output_prefix.model`` and ``.vocab`` atomically; return a summary with the identity."""
    spm = require("sentencepiece", "megatron-align tokenizer train")
    paths = expand_inputs(inputs)
    output_prefix = _output_prefix(output_prefix)
    skipped: dict[str, int] = {}
    counts = {"documents": 0, "sentences": 0}
    errors: list[Exception] = []
    model = io.BytesIO()
    spm.set_random_generator_seed(config.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(iter_documents(paths, config.text_field, skipped), counts, errors),
            model_writer=model,
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            character_coverage=config.character_coverage,
            byte_fallback=True,
            user_defined_symbols=list(config.control_tokens),
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            normalization_rule_name=config.normalization,
            remove_extra_whitespaces=False,
            input_sentence_size=config.max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=config.max_sentence_length,
            num_threads=config.num_threads,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as err:  # e.g. "Vocabulary size too high" on a small corpus
        if errors:
            raise errors[0] from None
        if counts["sentences"] == 0:
            raise UserError(f"{', '.join(paths)}: no text to train on (field {config.text_field!r}; "
                            f"skipped lines: {skipped or 'none'})") from err
        raise UserError(f"sentencepiece training on {', '.join(paths)} failed: {err}. "
                        "A smaller --vocab-size or more text usually fixes it.") from err
    blob = model.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=blob)

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp = f".tmp-{os.getpid()}"
    model_path, vocab_path = output_prefix + ".model", output_prefix + ".vocab"
    try:
        with open(vocab_path + tmp, "w", encoding="utf-8") as f:
            for i in range(processor.get_piece_size()):
                f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")
        with open(model_path + tmp, "wb") as f:
            f.write(blob)
        os.replace(vocab_path + tmp, vocab_path)
        os.replace(model_path + tmp, model_path)  # the model last: it is what readers load
    finally:
        for path in (vocab_path + tmp, model_path + tmp):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    tokenizer = SentencePieceTokenizer(model_path, list(config.control_tokens))
    return {"model": model_path, "vocab": vocab_path, "identity": tokenizer.identity,
            "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod, "control_tokens": dict(tokenizer.control_token_ids),
            "documents": counts["documents"], "sentences": counts["sentences"], "skipped": skipped}


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TokenizerTrainConfig()
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL (.jsonl, .json, .gz, .zst) or Parquet files, or directories of them")
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
