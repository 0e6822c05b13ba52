"""Write Megatron IndexedDataset `.bin/.idx` pairs atomically, and merge many of them in a stream.

Both files are written under temporary names next to the target and renamed
only when complete (`.bin` first, `.idx` last): a reader never sees an `.idx`
that points into a half-written `.bin`, and a crash leaves only `*.tmp-*` files.

Documents are written through Megatron-Core's ``IndexedDatasetBuilder``. Merging
shards (:func:`merge_indexed`) does not use its ``add_index``: that keeps every
sequence length of every shard as a Python list until ``finalize``, so memory
grows with the corpus (NeMo #12993: >200 GB for 2,000 partitions). The merge
instead copies the ``.bin`` files and writes the ``.idx`` sections (lengths,
pointers, document indices) one shard and one block at a time from memory maps,
so memory stays flat; the bytes equal what the builder writes for the same
documents (tests/data/test_pipeline.py checks it).
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when every id fits (with headroom Megatron expects), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class AtomicIndexedWriter:
    """Stream documents into ``prefix.bin/.idx``; ``commit()`` publishes, ``abort()`` removes temps."""

    def __init__(self, prefix: str, vocab_size: int) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix = prefix
        self._tmp = f"{prefix}.tmp-{os.getpid()}"
        self._builder = IndexedDatasetBuilder(self._tmp + ".bin", dtype=token_dtype(vocab_size))
        self.num_documents = 0
        self.num_tokens = 0

    def add(self, ids) -> None:
        array = np.asarray(ids, dtype=np.int64)
        self._builder.add_document(torch.from_numpy(array), [len(array)])
        self.num_documents += 1
        self.num_tokens += len(array)

    def commit(self) -> None:
        self._builder.finalize(self._tmp + ".idx")
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")

    def abort(self) -> None:
        for ext in (".bin", ".idx"):
            try:
                os.remove(self._tmp + ext)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "AtomicIndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_indexed_dataset(documents: Iterable[list[int]], prefix: str, vocab_size: int, eod: int | None) -> tuple[int, int]:
    """Write token-id documents (EOD appended when given); returns (documents, tokens)."""
    with AtomicIndexedWriter(prefix, vocab_size) as writer:
        for ids in documents:
            writer.add(list(ids) + ([eod] if eod is not None else []))
    return writer.num_documents, writer.num_tokens


_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEAD = len(_IDX_MAGIC) + 8 + 1 + 8 + 8  # magic, version <Q, dtype code <B, sequences <Q, documents <Q
_BLOCK = 1 << 20  # entries per block of an .idx section


def _read_idx_header(path: str) -> tuple[int, int, int]:
    """(dtype code, sequences, documents) of a Megatron ``.idx`` (version 1)."""
    with open(path, "rb") as f:
        head = f.read(_IDX_HEAD)
    if len(head) != _IDX_HEAD or head[: len(_IDX_MAGIC)] != _IDX_MAGIC or struct.unpack("<Q", head[9:17])[0] != 1:
        raise ValueError(f"{path}: not a Megatron IndexedDataset index (version 1)")
    code = head[17]
    sequences, documents = struct.unpack("<QQ", head[18:34])
    return code, sequences, documents


def merge_indexed(shard_prefixes: Sequence[str], prefix: str) -> tuple[int, int]:
    """Concatenate shards into ``prefix.bin/.idx`` (atomically, `.idx` last); returns (sequences, tokens).

    Memory is independent of the number of shards and of their size: each section is streamed.
    """
    heads = [_read_idx_header(p + ".idx") for p in shard_prefixes]
    codes = {h[0] for h in heads}
    if len(codes) != 1:
        raise ValueError(f"shards under {os.path.dirname(prefix) or '.'} mix token dtypes (codes {sorted(codes)})")
    code = codes.pop()
    itemsize = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}[code]  # Megatron's DType codes
    total_seq = sum(h[1] for h in heads)
    total_docs = 1 + sum(h[2] - 1 for h in heads)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)

    def sections(path: str, sequences: int, documents: int):
        mm = np.memmap(path, mode="r", dtype=np.uint8)
        lengths = mm[_IDX_HEAD:_IDX_HEAD + 4 * sequences].view(np.int32)
        docs_at = _IDX_HEAD + 12 * sequences
        return lengths, mm[docs_at:docs_at + 8 * documents].view(np.int64)

    try:
        with open(tmp + ".bin", "wb") as out:
            for p in shard_prefixes:
                with open(p + ".bin", "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        tokens = 0
        with open(tmp + ".idx", "wb") as out:
            out.write(_IDX_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<QQ", total_seq, total_docs))
            for p, (_, n, d) in zip(shard_prefixes, heads):  # sequence lengths
                lengths, _ = sections(p + ".idx", n, d)
                for i in range(0, n, _BLOCK):
                    block = lengths[i:i + _BLOCK]
                    out.write(block.tobytes())
                    tokens += int(block.sum(dtype=np.int64))
            pointer = 0
            for p, (_, n, d) in zip(shard_prefixes, heads):  # sequence pointers (bytes into .bin)
                lengths, _ = sections(p + ".idx", n, d)
                for i in range(0, n, _BLOCK):
                    sizes = lengths[i:i + _BLOCK].astype(np.int64) * itemsize
                    out.write((pointer + np.cumsum(sizes) - sizes).tobytes())
                    pointer += int(sizes.sum())
            out.write(np.zeros(1, dtype=np.int64).tobytes())
            offset = 0
            for p, (_, n, d) in zip(shard_prefixes, heads):  # document indices, each shard's after its leading 0
                _, documents = sections(p + ".idx", n, d)
                for i in range(1, d, _BLOCK):
                    out.write((documents[i:i + _BLOCK] + offset).tobytes())
                offset += n
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    except BaseException:
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise
    return total_seq, tokens
