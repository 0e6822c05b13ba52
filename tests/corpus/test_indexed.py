"""The .bin/.idx format written with numpy: the same bytes as Megatron-Core's builder, read by Megatron-Core's
reader, and a merge whose memory does not grow with the shards it concatenates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_align.corpus.indexed import AtomicIndexedWriter, check_indexed_files, merge_indexed, token_dtype

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _documents(seed: int, count: int, vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, rng.integers(1, 40)).tolist() for _ in range(count)]


def _builder_bytes(documents: list[list[int]], vocab_size: int, prefix: str) -> dict[str, bytes]:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype(vocab_size))
    for ids in documents:
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(prefix + ".idx")
    return {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")}


@pytest.mark.parametrize("vocab_size", [512, 70_000])  # uint16 and int32 tokens
def test_writer_and_merge_write_megatron_builders_bytes_and_megatron_reads_them(tmp_path, vocab_size):
    shards = [_documents(seed, count, vocab_size) for seed, count in enumerate((50, 0, 7, 120))]  # one shard empty
    everything = [ids for shard in shards for ids in shard]
    expected = _builder_bytes(everything, vocab_size, str(tmp_path / "builder"))
    with AtomicIndexedWriter(str(tmp_path / "single"), vocab_size) as writer:
        for ids in everything:
            writer.add(ids)
    for i, shard in enumerate(shards):
        with AtomicIndexedWriter(str(tmp_path / f"shard{i}"), vocab_size) as writer:
            if shard:
                writer.add_documents(np.concatenate(shard), [len(ids) for ids in shard])
    assert merge_indexed([str(tmp_path / f"shard{i}") for i in range(len(shards))], str(tmp_path / "merged")) == (
        len(everything), sum(map(len, everything)))
    for name in ("single", "merged"):
        assert {ext: (tmp_path / f"{name}{ext}").read_bytes() for ext in (".bin", ".idx")} == expected, name
        check_indexed_files(str(tmp_path / name), vocab_size)
    dataset = IndexedDataset(str(tmp_path / "merged"))
    assert len(dataset) == len(everything)
    for i in (0, 57, len(everything) - 1):
        assert dataset[i].tolist() == everything[i]
    assert not list(tmp_path.glob("*.tmp-*"))


MERGE = r"""
import json, re, sys
from megatron_align.corpus.indexed import merge_indexed
def status(key):  # kB from /proc (VmHWM: this process's own peak, unlike ru_maxrss, which survives fork + exec)
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))
prefixes, out = sys.argv[1:-1], sys.argv[-1]
before = status("VmRSS")
result = merge_indexed(prefixes, out)
print(json.dumps({"growth_mb": (status("VmHWM") - before) / 1024, "result": result,
                  "heavy": [m for m in ("torch", "megatron.core") if m in sys.modules]}))
"""


def test_merge_streams_shards_larger_than_its_memory(tmp_path):
    """4 shards of ~60 MB (1M documents each): the merge's peak memory grows by less than a quarter of ONE shard,
    so a merge that holds a shard's tokens or index (let alone all of them) in memory fails here."""
    rng = np.random.default_rng(0)
    prefixes, sizes = [], []
    for i in range(4):
        lengths = rng.integers(1, 40, 1_000_000)
        prefix = str(tmp_path / f"shard{i}")
        with AtomicIndexedWriter(prefix, 512) as writer:
            writer.add_documents(rng.integers(0, 512, int(lengths.sum()), dtype=np.uint16), lengths)
        prefixes.append(prefix)
        sizes.append(os.path.getsize(prefix + ".bin") + os.path.getsize(prefix + ".idx"))
    out = subprocess.run([sys.executable, "-c", MERGE, *prefixes, str(tmp_path / "merged")], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    shard_mb = min(sizes) / 2**20
    print(f"merge of 4 shards of {shard_mb:.0f} MB: peak RSS grew by {row['growth_mb']:.1f} MB")
    assert row["growth_mb"] < 0.25 * shard_mb, row
    assert row["heavy"] == []  # the merge needs neither torch nor megatron
    check_indexed_files(str(tmp_path / "merged"), 512)
    merged = np.memmap(str(tmp_path / "merged.idx"), dtype=np.uint8, mode="r")
    assert row["result"][0] == int(merged[18:26].view(np.uint64)[0]) == 4_000_000
    assert os.path.getsize(tmp_path / "merged.bin") == sum(os.path.getsize(p + ".bin") for p in prefixes)
