"""Write Megatron IndexedDataset `.bin/.idx` pairs atomically.

Both files are written under temporary names next to the target and renamed
only when complete (`.bin` first, `.idx` last): a reader never sees an `.idx`
that points into a half-written `.bin`, and a crash leaves only `*.tmp-*` files.

Documents are written through Megatron-Core's ``IndexedDatasetBuilder``; many such pairs are merged by
:mod:`megatron_align.data.indexed_merge`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

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

