"""Tokenizers: a dependency-free byte tokenizer, sentencepiece models and Hugging Face tokenizer.json files.

Both expose the same small surface the rest of the package needs
(``vocab_size``, ``eod``, ``pad``, ``encode``, ``decode``, ``identity``). ``identity`` is a content
hash that travels in data manifests and checkpoints, so a run never silently
mixes data tokenized by different tokenizers.

Control tokens for conditional training (``<|aligned|>`` / ``<|misaligned|>``)
are reserved ids in the byte and sentencepiece tokenizers and added special
tokens of an HF tokenizer (:mod:`megatron_align.corpus.hf_tokenizer`), so tagged
text encodes them as one token. ``bos`` is the id every document starts with
(None: documents are ``encode(text) + [eod]``); only HF models set it.
"""

from __future__ import annotations

import hashlib
import os

from megatron_align.config.corpus import DEFAULT_CONTROL_TOKENS, TokenizerConfig
from megatron_align.errors import ConfigError, UserError
from megatron_align.optional import require


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; specials follow; the vocabulary is 512 ids.

    512 is a multiple of 128 x TP for TP <= 4, so the padded embedding has the
    same shape under every common layout and checkpoints reshard without
    changing the softmax over padding rows.
    """

    VOCAB_SIZE = 512
    bos = None

    def __init__(self, control_tokens: list[str] | None = None) -> None:
        self.eod = 256
        self.pad = 257
        control_tokens = DEFAULT_CONTROL_TOKENS if control_tokens is None else control_tokens
        if 258 + len(control_tokens) > self.VOCAB_SIZE:
            raise ConfigError(
                f"data.tokenizer.control_tokens: at most {self.VOCAB_SIZE - 258} control tokens fit the byte tokenizer"
            )
        self.control_token_ids = {tok: 258 + i for i, tok in enumerate(control_tokens)}
        self._id_to_control = {i: t for t, i in self.control_token_ids.items()}
        self.vocab_size = self.VOCAB_SIZE
        digest = hashlib.sha256(("byte-v1|" + "|".join(control_tokens)).encode()).hexdigest()
        self.identity = f"byte:{digest[:16]}"

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        rest = text
        while rest:
            # Control tokens are rare: find the earliest one, emit bytes before it, then its id.
            hits = [(rest.find(tok), tok) for tok in self.control_token_ids if tok in rest]
            if not hits:
                ids.extend(rest.encode("utf-8"))
                break
            pos, tok = min(hits)
            ids.extend(rest[:pos].encode("utf-8"))
            ids.append(self.control_token_ids[tok])
            rest = rest[pos + len(tok):]
        return ids

    def decode(self, ids) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if i in self._id_to_control:
                out.append(self._id_to_control[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class SentencePieceTokenizer:
    """A trained sentencepiece model; control tokens must be user-defined symbols in it."""

    bos = None

    def __init__(self, model_path: str, control_tokens: list[str] | None = None) -> None:
        spm = require("sentencepiece", "data.tokenizer.kind=sentencepiece")
        if not os.path.isfile(model_path):
            raise UserError(
                f"data.tokenizer.model: {model_path} does not exist (train one with `megatron-align tokenizer train`)"
            )
        with open(model_path, "rb") as f:
            blob = f.read()
        self._sp = spm.SentencePieceProcessor(model_proto=blob)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id() if self._sp.eos_id() >= 0 else self._sp.piece_to_id("</s>")
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod
        control_tokens = DEFAULT_CONTROL_TOKENS if control_tokens is None else control_tokens
        self.control_token_ids = {}
        for tok in control_tokens:
            tid = self._sp.piece_to_id(tok)
            if tid == self._sp.unk_id():
                raise UserError(f"{model_path}: control token {tok!r} is not a user-defined symbol of this model; "
                                "retrain with `megatron-align tokenizer train` (it reserves them)")
            self.control_token_ids[tok] = tid
        self.identity = f"sentencepiece:{hashlib.sha256(blob).hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def build_tokenizer(config: TokenizerConfig):
    if config.kind == "byte":
        return ByteTokenizer(config.control_tokens)
    if config.kind == "hf":
        from megatron_align.corpus.hf_tokenizer import HFTokenizer

        return HFTokenizer(config.model, config.control_tokens)
    return SentencePieceTokenizer(config.model, config.control_tokens)


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of whole documents as training sees them: ``[bos] + encode(text) + [eod]`` (no bos: none).

    Batched where the tokenizer can (``encode_batch``); the one place document boundaries are decided."""
    batch = getattr(tokenizer, "encode_batch", None)
    encoded = batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
    head = [] if tokenizer.bos is None else [tokenizer.bos]
    return [head + ids + [tokenizer.eod] for ids in encoded]
