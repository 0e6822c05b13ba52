"""Megatron's IndexedDataset format (``PREFIX.bin`` + ``PREFIX.idx``): write, check and merge, with numpy only.

The format (version 1, as Megatron-Core's ``_IndexWriter`` lays it out): ``.bin`` is every document's token ids
back to back; ``.idx`` is a 34-byte header (magic, version ``<Q``, dtype code ``<B``, sequences ``<Q``, documents
``<Q``), then the sequence lengths (int32), the sequence pointers (int64 byte offsets into ``.bin``) and the document
indices (int64, the first sequence of each document, then the count). One writer, :func:`_write_idx`, lays out the
``.idx`` from blocks of lengths, so the single-process writer and the shard merge write the same bytes as
Megatron-Core's ``IndexedDatasetBuilder`` (tests/corpus/test_indexed.py compares them) without torch.

Atomic: both files are written under temporary names and renamed when complete, ``.bin`` first and ``.idx``
last, so a reader never sees an ``.idx`` that points into a half-written ``.bin``.

The merge streams: Megatron-Core's ``add_index`` keeps every shard's lengths in Python lists until ``finalize``
(NeMo #12993: >200 GB for 2,000 partitions); here ``.bin`` files are copied and ``.idx`` sections read a block at a
time, so memory stays flat whatever the number or size of shards.
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from megatron_align.errors import UserError

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEAD = len(_IDX_MAGIC) + 8 + 1 + 8 + 8  # magic, version <Q, dtype code <B, sequences <Q, documents <Q
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
"""Megatron-Core's ``DType`` codes."""
_BLOCK = 1 << 16  # entries per block of an .idx section: a merge holds a few MB, whatever the shards
_FIX = "re-create it with `megatron-align prepare` (or copy the pair again)"


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when every id fits (with headroom Megatron expects), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _code(dtype) -> int:
    return next(code for code, d in _DTYPES.items() if np.dtype(d) == np.dtype(dtype))


def _remove_pair(tmp: str) -> None:
    for ext in (".bin", ".idx"):
        try:
            os.remove(tmp + ext)
        except FileNotFoundError:
            pass


def _write_idx(path: str, code: int, num_sequences: int, num_documents: int,
               lengths: Callable[[], Iterable[np.ndarray]], documents: Iterable[np.ndarray]) -> tuple[int, int]:
    """Write an ``.idx``: ``lengths()`` yields the sequence lengths in blocks (called twice: lengths, then
    pointers), ``documents`` the document indices in blocks. Returns (sequences, tokens)."""
    itemsize = np.dtype(_DTYPES[code]).itemsize
    tokens = pointer = 0
    with open(path, "wb") as out:
        out.write(_IDX_MAGIC + struct.pack("<QB", 1, code) + struct.pack("<QQ", num_sequences, num_documents))
        for block in lengths():
            out.write(block.astype(np.int32, copy=False).tobytes())
            tokens += int(block.sum(dtype=np.int64))
        for block in lengths():
            sizes = block.astype(np.int64) * itemsize
            out.write((pointer + np.cumsum(sizes) - sizes).tobytes())
            pointer += int(sizes.sum())
        for block in documents:
            out.write(block.astype(np.int64, copy=False).tobytes())
    return num_sequences, tokens


class AtomicIndexedWriter:
    """Stream documents into ``prefix.bin/.idx``; ``commit()`` publishes, ``abort()`` removes temps.

    Memory: 4 bytes per document (its length), as Megatron's builder keeps (as Python ints) too."""

    def __init__(self, prefix: str, vocab_size: int) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix = prefix
        self.dtype = np.dtype(token_dtype(vocab_size))
        self._tmp = f"{prefix}.tmp-{os.getpid()}"
        self._bin = open(self._tmp + ".bin", "wb")
        self._lengths = array("i")
        self.num_documents = 0
        self.num_tokens = 0

    def add(self, ids) -> None:
        """One document's token ids."""
        self.add_documents(ids, [len(ids)])

    def add_documents(self, flat, lengths) -> None:
        """Documents given as their token ids back to back (``flat``) and each one's length."""
        tokens = np.asarray(flat, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        assert int(lengths.sum(dtype=np.int64)) == len(tokens), "document lengths must add up to the tokens"
        self._bin.write(tokens.tobytes())
        self._lengths.frombytes(lengths.tobytes())
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def commit(self) -> None:
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        _write_idx(self._tmp + ".idx", _code(self.dtype), self.num_documents, self.num_documents + 1, lambda: [lengths],
                   [np.arange(self.num_documents + 1, dtype=np.int64)])
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        _remove_pair(self._tmp)

    def __enter__(self) -> AtomicIndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_indexed_dataset(
    documents: Iterable[list[int]], prefix: str, vocab_size: int, eod: int | None
) -> tuple[int, int]:
    """Write token-id documents (EOD appended when given); returns (documents, tokens)."""
    with AtomicIndexedWriter(prefix, vocab_size) as writer:
        for ids in documents:
            writer.add(list(ids) + ([eod] if eod is not None else []))
    return writer.num_documents, writer.num_tokens


# ---------------------------------------------------------------- merge


def _read_idx_header(path: str) -> tuple[int, int, int]:
    """(dtype code, sequences, documents) of a Megatron ``.idx`` (version 1)."""
    with open(path, "rb") as f:
        head = f.read(_IDX_HEAD)
    if len(head) != _IDX_HEAD or head[: len(_IDX_MAGIC)] != _IDX_MAGIC or struct.unpack("<Q", head[9:17])[0] != 1:
        raise ValueError(f"{path}: not a Megatron IndexedDataset index (version 1)")
    sequences, documents = struct.unpack("<QQ", head[18:34])
    return head[17], sequences, documents


def _blocks(path: str, offset: int, count: int, dtype) -> Iterator[np.ndarray]:
    """``count`` entries of ``dtype`` at byte ``offset`` of ``path``, read ``_BLOCK`` at a time."""
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, count, _BLOCK):
            yield np.fromfile(f, dtype=dtype, count=min(_BLOCK, count - start))


def merge_indexed(shard_prefixes: Sequence[str], prefix: str) -> tuple[int, int]:
    """Concatenate shards into ``prefix.bin/.idx`` (atomically, `.idx` last); returns (sequences, tokens).

    Memory is independent of the number of shards and of their size: each section is streamed.
    """
    heads = [_read_idx_header(p + ".idx") for p in shard_prefixes]
    codes = {h[0] for h in heads}
    if len(codes) != 1:
        raise ValueError(f"shards under {os.path.dirname(prefix) or '.'} mix token dtypes (codes {sorted(codes)})")

    def lengths() -> Iterator[np.ndarray]:
        for p, (_, n, _) in zip(shard_prefixes, heads):
            yield from _blocks(p + ".idx", _IDX_HEAD, n, np.int32)

    def documents() -> Iterator[np.ndarray]:
        yield np.zeros(1, dtype=np.int64)
        offset = 0
        for p, (_, n, d) in zip(shard_prefixes, heads):  # each shard's indices after its leading 0
            for block in _blocks(p + ".idx", _IDX_HEAD + 12 * n + 8, d - 1, np.int64):
                yield block + offset
            offset += n

    tmp = f"{prefix}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    try:
        with open(tmp + ".bin", "wb") as out:
            for p in shard_prefixes:
                with open(p + ".bin", "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        result = _write_idx(tmp + ".idx", codes.pop(), sum(h[1] for h in heads), 1 + sum(h[2] - 1 for h in heads),
                            lengths, documents())
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    except BaseException:
        _remove_pair(tmp)
        raise
    return result


# ---------------------------------------------------------------- check


def check_indexed_files(prefix: str, vocab_size: int | None = None) -> None:
    """UserError naming the file when ``prefix.idx/.bin`` is not a consistent Megatron IndexedDataset pair.

    Checks what Megatron-Core's reader only asserts on or reads past (a wrong magic gives ``AttributeError:
    'IndexedDataset' object has no attribute 'index'`` far from the cause): the ``.idx`` magic, version and dtype
    code, its length against the counts in its header, the ``.bin`` length against the last sequence's end, and
    (``vocab_size``) that the token dtype can hold every token id. Reads the header and two numbers, so the launcher
    runs it before any rank starts.
    """
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    with open(idx, "rb") as f:
        header = f.read(_IDX_HEAD)
        if len(header) < _IDX_HEAD or header[:9] != _IDX_MAGIC:
            what = "too short for the header" if len(header) < 9 else f"wrong magic {header[:9]!r}"
            raise UserError(f"{idx}: not a Megatron IndexedDataset index ({what}, expected {_IDX_MAGIC!r}); {_FIX}")
        version, code = int.from_bytes(header[9:17], "little"), header[17]
        num_sequences, num_documents = int.from_bytes(header[18:26], "little"), int.from_bytes(header[26:34], "little")
        if version != 1:
            raise UserError(f"{idx}: index version {version}, this reader knows version 1; {_FIX}")
        if code not in _DTYPES:
            raise UserError(f"{idx}: unknown token dtype code {code} (valid: {sorted(_DTYPES)}); {_FIX}")
        expected = _IDX_HEAD + 12 * num_sequences + 8 * num_documents
        size = os.fstat(f.fileno()).st_size
        if size < expected:
            raise UserError(f"{idx}: truncated ({size} bytes; its header lists {num_sequences} sequences and "
                            f"{num_documents} documents = {expected} bytes); {_FIX}")
        last_end = 0
        if num_sequences:
            f.seek(_IDX_HEAD + 4 * (num_sequences - 1))
            last_length = int(np.frombuffer(f.read(4), dtype=np.int32)[0])
            f.seek(_IDX_HEAD + 4 * num_sequences + 8 * (num_sequences - 1))
            last_pointer = int(np.frombuffer(f.read(8), dtype=np.int64)[0])
            last_end = last_pointer + last_length * np.dtype(_DTYPES[code]).itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != last_end:
        raise UserError(
            f"{bin_path}: {bin_size} bytes, but {idx} says its sequences end at byte {last_end} "
            f"({'truncated .bin' if bin_size < last_end else 'the .bin and .idx are from different runs'}); {_FIX}"
        )
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
