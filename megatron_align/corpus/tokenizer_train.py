"""Train a sentencepiece tokenizer (`megatron-align tokenizer train`) from JSONL documents.

What: documents are read from JSONL (same reader and skip rules as
``prepare``), split into lines and streamed into sentencepiece's trainer,
which reservoir-samples at most ``max_sentences`` of them. The result is
``OUT.model`` (+ ``OUT.vocab``, one ``piece<TAB>score`` per id), loadable by
:class:`~megatron_align.corpus.tokenizer.SentencePieceTokenizer`.

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

import io
import os
from collections.abc import Iterator

from megatron_align.config.corpus import TokenizerTrainConfig
from megatron_align.corpus.sources import expand_inputs, iter_documents
from megatron_align.corpus.tokenizer import SentencePieceTokenizer
from megatron_align.errors import UserError
from megatron_align.fileio import atomic_write_bytes, atomic_write_text
from megatron_align.optional import require


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
    model_path, vocab_path = output_prefix + ".model", output_prefix + ".vocab"
    atomic_write_text(vocab_path, "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
                                          for i in range(processor.get_piece_size())))
    atomic_write_bytes(model_path, blob)  # the model last: it is what readers load
    tokenizer = SentencePieceTokenizer(model_path, list(config.control_tokens))
    return {
        "model": model_path,
        "vocab": vocab_path,
        "identity": tokenizer.identity,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "control_tokens": dict(tokenizer.control_token_ids),
        "documents": counts["documents"],
        "sentences": counts["sentences"],
        "skipped": skipped,
    }
