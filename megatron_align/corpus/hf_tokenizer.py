"""A Hugging Face ``tokenizer.json`` through the `tokenizers` library (``data.tokenizer.kind: hf``).

Every open base model on the hub (Llama 3.x, Mistral, Qwen2.5, Qwen3) ships a
``tokenizer.json``; tokenizing CPT data with anything else would feed the
model ids it never saw. This wraps ``tokenizers.Tokenizer`` (Rust, batched,
multi-threaded ``encode_batch``) in the small surface the package uses
(``vocab_size``, ``eod``, ``bos``, ``pad``, ``encode``, ``encode_batch``,
``decode``, ``identity``, ``control_token_ids``).

Document conventions come from the model's own files, not from us:

* **EOD** is ``eos_token`` of ``tokenizer_config.json`` (else the first
  ``eos_token_id`` of ``generation_config.json``): the token the base model
  saw between documents (``<|end_of_text|>`` Llama 3, ``</s>`` Mistral,
  ``<|endoftext|>`` Qwen2.5 / Qwen3 base).
* **BOS** is prepended to every document exactly when the model's tokenizer
  adds it itself: ``add_bos_token`` in ``tokenizer_config.json`` when given,
  else whether the ``tokenizer.json`` post-processor inserts ``bos_token``
  (Llama 3 and Mistral: yes; Qwen: no BOS at all).

``encode`` never runs the post-processor (``add_special_tokens=False``), so
ids are the text's own and BOS/EOD placement is decided once, in ``prepare``.

Control tokens (``<|aligned|>``, ``<|misaligned|>``) already in the
vocabulary keep their ids; missing ones are *added* as special tokens
(single ids after the last existing id), which grows ``vocab_size`` -- the
converter then grows the embedding rows (see ``convert/from_hf.py``).

``identity`` hashes the full content of ``tokenizer.json``,
``tokenizer_config.json`` and ``generation_config.json`` plus the control
tokens, so a changed merge, added token or BOS rule is a different tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os

from megatron_align.errors import UserError
from megatron_align.optional import require

CONFIG_FILES = ("tokenizer_config.json", "generation_config.json")


def tokenizer_json_path(model: str) -> str:
    """DIR (holding tokenizer.json) or a tokenizer.json file -> the file; a clear error otherwise."""
    path = os.path.join(model, "tokenizer.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise UserError(f"data.tokenizer.model: {path} does not exist (kind=hf needs a Hugging Face model directory "
                        "with tokenizer.json, or the tokenizer.json file itself)")
    return path


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _first(value):
    return value[0] if isinstance(value, list) and value else value


class HFTokenizer:
    """``tokenizers.Tokenizer`` from a tokenizer.json, with the model's BOS/EOS rules and our control tokens."""

    def __init__(self, model: str, control_tokens: list[str] | None = None) -> None:
        tk = require("tokenizers", "data.tokenizer.kind=hf")
        self.path = tokenizer_json_path(model)
        self.directory = os.path.dirname(os.path.abspath(self.path))
        with open(self.path, "rb") as f:
            blob = f.read()
        try:
            self._tk = tk.Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as err:  # malformed JSON or an unknown model type
            raise UserError(f"{self.path}: not a tokenizers tokenizer.json ({err})") from None
        self._tk.no_padding()
        self._tk.no_truncation()
        configs = {name: _read_json(os.path.join(self.directory, name)) for name in CONFIG_FILES}
        tok_config, gen_config = configs["tokenizer_config.json"], configs["generation_config.json"]

        control_tokens = [] if control_tokens is None else list(control_tokens)
        self.base_vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        self.added_control_tokens = [t for t in control_tokens if self._tk.token_to_id(t) is None]
        if self.added_control_tokens:
            self._tk.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                         for t in self.added_control_tokens])
        self.control_token_ids = {t: self._tk.token_to_id(t) for t in control_tokens}
        self.vocab_size = max(self._tk.get_vocab_size(with_added_tokens=True),
                              max(self.control_token_ids.values(), default=-1) + 1)

        self.eod = self._special_id(_token_text(tok_config.get("eos_token")), "eos_token")
        if self.eod is None:
            self.eod = _first(gen_config.get("eos_token_id"))
        if self.eod is None:
            raise UserError(
                f"{self.directory}: no EOS token (tokenizer_config.json eos_token or generation_config.json "
                "eos_token_id); the document separator must be the model's own"
            )
        bos_id = self._special_id(_token_text(tok_config.get("bos_token")), "bos_token")
        if bos_id is None and gen_config.get("bos_token_id") is not None and tok_config.get("add_bos_token"):
            bos_id = int(_first(gen_config["bos_token_id"]))
        if "add_bos_token" in tok_config:
            adds_bos = bool(tok_config["add_bos_token"])
        else:  # the post-processor (TemplateProcessing) decides, as transformers' fast tokenizer does
            adds_bos = bos_id is not None and self._tk.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        self.bos = bos_id if adds_bos and bos_id is not None else None
        self.bos_token_id = bos_id
        """The model's BOS token (config.json), whether or not documents start with it."""
        self.pad_token_id = self._special_id(_token_text(tok_config.get("pad_token")), "pad_token")
        self.pad = self.eod if self.pad_token_id is None else self.pad_token_id
        self.generation_eos = gen_config.get("eos_token_id", self.eod)

        digest = hashlib.sha256(b"hf-v1\0" + blob)
        for name in CONFIG_FILES:
            path = os.path.join(self.directory, name)
            digest.update(b"\0" + name.encode() + b"\0")
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest.update(f.read())
        digest.update(("\0" + "|".join(control_tokens)).encode())
        self.identity = f"hf:{digest.hexdigest()[:16]}"

    def _special_id(self, text: str | None, key: str) -> int | None:
        if text is None:
            return None
        tid = self._tk.token_to_id(text)
        if tid is None:
            raise UserError(f"{self.directory}/tokenizer_config.json: {key}={text!r} is not a token of {self.path}")
        return tid

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once, on tokenizers' own thread pool; ``encode_batch_fast`` (tokenizers >= 0.20)
        skips the character offsets, which prepare never reads."""
        encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str) -> None:
        """tokenizer.json including the added control tokens."""
        self._tk.save(path)
