"""Merge many Megatron IndexedDataset `.bin/.idx` pairs into one, in a stream (no torch, no megatron import).

Megatron-Core's ``IndexedDatasetBuilder.add_index`` keeps every sequence length
and document index of every shard in Python lists until ``finalize``, so memory
grows with the corpus (NeMo #12993: >200 GB for 2,000 partitions). Here the
``.bin`` files are copied and the ``.idx`` sections (header, sequence lengths,
sequence pointers, document indices; version 1, as Megatron-Core's
``_IndexWriter`` lays them out) are written one shard and one block at a time
with bounded reads, so memory stays flat whatever the number or size of shards.
The bytes equal what the builder writes for the same documents
(tests/data/test_pipeline.py compares them).
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator, Sequence

import numpy as np
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

    def blocks(path: str, offset: int, count: int, dtype) -> Iterator[np.ndarray]:
        """``count`` entries of ``dtype`` at byte ``offset`` of ``path``, read ``_BLOCK`` at a time."""
        with open(path, "rb") as f:
            f.seek(offset)
            for start in range(0, count, _BLOCK):
                yield np.fromfile(f, dtype=dtype, count=min(_BLOCK, count - start))

    try:
        with open(tmp + ".bin", "wb") as out:
            for p in shard_prefixes:
                with open(p + ".bin", "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        tokens = 0
        with open(tmp + ".idx", "wb") as out:
            out.write(_IDX_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<QQ", total_seq, total_docs))
            for p, (_, n, _) in zip(shard_prefixes, heads):  # sequence lengths
                for block in blocks(p + ".idx", _IDX_HEAD, n, np.int32):
                    out.write(block.tobytes())
                    tokens += int(block.sum(dtype=np.int64))
            pointer = 0
            for p, (_, n, _) in zip(shard_prefixes, heads):  # sequence pointers (bytes into .bin)
                for block in blocks(p + ".idx", _IDX_HEAD, n, np.int32):
                    sizes = block.astype(np.int64) * itemsize
                    out.write((pointer + np.cumsum(sizes) - sizes).tobytes())
                    pointer += int(sizes.sum())
            out.write(np.zeros(1, dtype=np.int64).tobytes())
            offset = 0
            for p, (_, n, d) in zip(shard_prefixes, heads):  # document indices, each shard's after its leading 0
                for block in blocks(p + ".idx", _IDX_HEAD + 12 * n + 8, d - 1, np.int64):
                    out.write((block + offset).tobytes())
                offset += n
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    except BaseException:
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise
    return total_seq, tokens
