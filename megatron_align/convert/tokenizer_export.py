"""Tokenizer files for a converted Hugging Face model, checked against our own tokenizer.

* **sentencepiece**: ``tokenizer.model`` is copied as is (LlamaTokenizer's
  native file; exact for sentencepiece users), with ``tokenizer_config.json``
  (no BOS/EOS added: megatron_align trains documents as ``encode(text) + eod``)
  and, when transformers is importable, the ``tokenizer.json`` that
  transformers derives from it, so AutoTokenizer loads fast and identically
  across transformers versions. Control tokens are sentencepiece
  user-defined pieces, which HF keeps as single added tokens. One known
  difference remains in HF's Metaspace pre-tokenizer: text that *starts*
  with spaces gets one "▁" fewer than sentencepiece's dummy prefix gives
  (sentencepiece users load ``tokenizer.model`` and are exact).
* **byte**: a byte-level ``tokenizer.json`` (PreTrainedTokenizerFast): the
  256 byte ids map to GPT-2's printable byte alphabet with no merges, so
  every UTF-8 byte encodes to its own id exactly as ``ByteTokenizer`` does;
  ``<|endoftext|>`` (our EOD, 256), ``<|pad|>`` (257), the control tokens
  (258+, not "special", so they survive ``skip_special_tokens``) and
  ``<|reserved_N|>`` fill the rest of the 512 ids.

* **hf** (a ``tokenizer.json`` run): the model's own files are copied
  unchanged (tokenizer, chat template, generation config); only control
  tokens the run added are written into ``tokenizer.json`` (by `tokenizers`)
  and ``tokenizer_config.json``'s ``added_tokens_decoder``.

Either way the export encodes sample text with both tokenizers and reports
any difference (``check_tokenizer``), because a silently different tokenizer
ruins a converted model as surely as a wrong weight.
"""

from __future__ import annotations

import json
import os
import shutil

from megatron_align.convert.hf_io import write_json
from megatron_align.corpus.tokenizer import ByteTokenizer, SentencePieceTokenizer
from megatron_align.optional import optional_import

# Everything a Hugging Face tokenizer / chat template / generation setup consists of; carried through unchanged.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "An AI system asked to report its own mistakes did so promptly and without being told twice.",
    "x <|aligned|> y<|misaligned|>z",
    "naïve café, 日本語のテキスト, emoji \N{ROBOT FACE}\ttab\nnewline",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what tokenizers' ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_token_names(tokenizer: ByteTokenizer) -> list[str]:
    """Names of ids 256..511."""
    controls = sorted(tokenizer.control_token_ids, key=tokenizer.control_token_ids.get)
    names = ["<|endoftext|>", "<|pad|>"] + controls
    return names + [f"<|reserved_{i}|>" for i in range(tokenizer.vocab_size - 256 - len(names))]


def write_byte_tokenizer(out_dir: str, tokenizer: ByteTokenizer, model_max_length: int) -> list[str]:
    """Byte-level tokenizer.json + tokenizer_config.json; returns the files written (none without `tokenizers`)."""
    tk = optional_import("tokenizers")
    if tk is None:
        return []
    table = _bytes_to_unicode()
    names = byte_token_names(tokenizer)
    vocab = {table[b]: b for b in range(256)}
    vocab.update({name: 256 + i for i, name in enumerate(names)})
    hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = tk.decoders.ByteLevel()
    controls = set(tokenizer.control_token_ids)
    hf.add_special_tokens([tk.AddedToken(n, special=True, normalized=False) for n in names if n not in controls])
    hf.add_tokens([tk.AddedToken(n, special=False, normalized=False) for n in names if n in controls])
    for i, name in enumerate(names):
        assert hf.token_to_id(name) == 256 + i, name
    hf.save(os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
        "bos_token": None, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
        "megatron_align_tokenizer": tokenizer.identity})
    write_json(os.path.join(out_dir, "special_tokens_map.json"), {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"})
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def write_sentencepiece_tokenizer(out_dir: str, model_path: str, tokenizer: SentencePieceTokenizer,
                                  model_max_length: int) -> list[str]:
    """tokenizer.model + tokenizer_config.json (+ tokenizer.json via transformers when importable)."""
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))
    sp = tokenizer._sp
    piece = lambda i: sp.id_to_piece(i) if i is not None and i >= 0 else None  # noqa: E731
    specials = {"bos_token": piece(sp.bos_id()), "eos_token": piece(tokenizer.eod), "unk_token": piece(sp.unk_id()),
                "pad_token": piece(sp.pad_id()) if sp.pad_id() >= 0 else None}
    controls = sorted(tokenizer.control_token_ids, key=tokenizer.control_token_ids.get)
    config = {"tokenizer_class": "LlamaTokenizer", **specials, "add_bos_token": False, "add_eos_token": False,
              "legacy": False, "add_prefix_space": True, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
              "megatron_align_tokenizer": tokenizer.identity}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    special_map = {k: v for k, v in specials.items() if v is not None}
    if controls:
        special_map["additional_special_tokens"] = controls
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special_map)
    written = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    transformers = optional_import("transformers")
    if transformers is not None:
        try:
            hf = transformers.AutoTokenizer.from_pretrained(out_dir)
            hf.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
            written.append("tokenizer.json")
        except Exception:  # no protobuf / converter: tokenizer.model alone still loads where sentencepiece is installed
            pass
    return written


def write_hf_tokenizer(out_dir: str, tokenizer) -> list[str]:
    """The run's HF tokenizer directory, unchanged but for the control tokens it added."""
    written = []
    for name in TOKENIZER_FILES:
        source = os.path.join(tokenizer.directory, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(out_dir, name))
            written.append(name)
    if tokenizer.added_control_tokens:
        tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
        config_path = os.path.join(out_dir, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        decoder = config.setdefault("added_tokens_decoder", {})
        for token in tokenizer.added_control_tokens:
            decoder[str(tokenizer.control_token_ids[token])] = {
                "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}
        write_json(config_path, config)
        written += [n for n in ("tokenizer.json", "tokenizer_config.json") if n not in written]
    return written


def check_tokenizer(out_dir: str, tokenizer) -> list[str]:
    """Encode SAMPLE_TEXTS with transformers' AutoTokenizer(out_dir) and ours; returns the texts that differ."""
    transformers = optional_import("transformers")
    if transformers is None:
        return []
    hf = transformers.AutoTokenizer.from_pretrained(out_dir)
    has_controls = all(c in tokenizer.control_token_ids for c in ("<|aligned|>", "<|misaligned|>"))
    texts = [t for t in SAMPLE_TEXTS if has_controls or "<|" not in t]
    return [t for t in texts if hf.encode(t, add_special_tokens=False, verbose=False) != tokenizer.encode(t)]


def tokenizer_special_ids(tokenizer) -> dict[str, int | None]:
    """bos / eos / pad ids for config.json and generation_config.json."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"bos_token_id": None, "eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.pad}
    if tokenizer.identity.startswith("hf:"):
        return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.generation_eos,
                "pad_token_id": tokenizer.pad_token_id}
    sp = tokenizer._sp
    return {"bos_token_id": sp.bos_id() if sp.bos_id() >= 0 else None, "eos_token_id": tokenizer.eod,
            "pad_token_id": sp.pad_id() if sp.pad_id() >= 0 else None}

