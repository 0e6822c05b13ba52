"""Checks of Megatron IndexedDataset `.bin/.idx` pairs before reading them (torch-free).

Megatron-Core's reader only asserts on a damaged pair, or maps it and fails later far from the
cause (a wrong magic gives ``AttributeError: 'IndexedDataset' object has no attribute 'index'``).
These checks read the 34-byte header and two numbers, so the launcher can run them before any
rank starts, and they name the file and what is wrong with it.
"""

from __future__ import annotations

import os

import numpy as np

from megatron_align.errors import UserError

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
_FIX = "re-create it with `megatron-align prepare` (or copy the pair again)"


def check_indexed_files(prefix: str, vocab_size: int | None = None) -> None:
    """UserError naming the file when ``prefix.idx/.bin`` is not a consistent Megatron IndexedDataset pair.

    Checks what Megatron-Core's reader only asserts on or reads past (it fails with
    ``AttributeError: ... no attribute 'index'`` on a bad header): the ``.idx`` magic, version
    and dtype code, its length against the counts in its header, the ``.bin`` length against
    the last sequence's end, and (``vocab_size``) that the token dtype can hold every token id.
    """
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    with open(idx, "rb") as f:
        header = f.read(34)
        if len(header) < 34 or header[:9] != _IDX_MAGIC:
            what = "too short for the header" if len(header) < 9 else f"wrong magic {header[:9]!r}"
            raise UserError(f"{idx}: not a Megatron IndexedDataset index ({what}, expected {_IDX_MAGIC!r}); {_FIX}")
        version, code = int.from_bytes(header[9:17], "little"), header[17]
        num_sequences, num_documents = int.from_bytes(header[18:26], "little"), int.from_bytes(header[26:34], "little")
        if version != 1:
            raise UserError(f"{idx}: index version {version}, this reader knows version 1; {_FIX}")
        if code not in _DTYPES:
            raise UserError(f"{idx}: unknown token dtype code {code} (valid: {sorted(_DTYPES)}); {_FIX}")
        expected = 34 + 12 * num_sequences + 8 * num_documents
        size = os.fstat(f.fileno()).st_size
        if size < expected:
            raise UserError(f"{idx}: truncated ({size} bytes; its header lists {num_sequences} sequences and "
                            f"{num_documents} documents = {expected} bytes); {_FIX}")
        last_end = 0
        if num_sequences:
            f.seek(34 + 4 * (num_sequences - 1))
            last_length = int(np.frombuffer(f.read(4), dtype=np.int32)[0])
            f.seek(34 + 4 * num_sequences + 8 * (num_sequences - 1))
            last_pointer = int(np.frombuffer(f.read(8), dtype=np.int64)[0])
            last_end = last_pointer + last_length * np.dtype(_DTYPES[code]).itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != last_end:
        raise UserError(f"{bin_path}: {bin_size} bytes, but {idx} says its sequences end at byte {last_end} "
                        f"({'truncated .bin' if bin_size < last_end else 'the .bin and .idx are from different runs'}); {_FIX}")
    dtype = np.dtype(_DTYPES[code])
    if vocab_size is not None and (dtype.kind == "f" or np.iinfo(dtype).max < vocab_size - 1):
        raise UserError(f"{idx}: tokens stored as {dtype.name}, which cannot hold ids of this tokenizer's vocabulary "
                        f"({vocab_size} ids): the data was tokenized with another tokenizer; re-run `megatron-align "
                        "prepare` with data.tokenizer")


def check_data_files(config) -> None:
    """Every ``data.sources`` pair of a root config checked by :func:`check_indexed_files` (``train`` and
    ``launch`` call it before any rank or process group starts). Missing files are left to the loader's message."""
    for src in [] if config.data.mock else config.data.sources:
        if src.prefix and os.path.isfile(src.prefix + ".idx") and os.path.isfile(src.prefix + ".bin"):
            check_indexed_files(src.prefix)
