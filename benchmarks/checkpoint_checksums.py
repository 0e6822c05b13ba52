#!/usr/bin/env python
"""Checkpoint checksums: digest speed per core, and the checksum's share of a real checkpoint save.

Side by side in one process (the box may be loaded: compare the ratios, not absolute numbers):

1. one core digesting an in-memory buffer of ``--mb`` MB with xxh3-64 (what the checkpoint marker
   records), zlib's CRC-32 and SHA-256, best of 3: seconds per GB per core;
2. a real ``CheckpointManager.save`` (Megatron-Core dist_checkpointing, torch_dist, synchronous, one
   gloo rank) of ``--save-mb`` MB of fp32 tensors into ``--dir``, which digests its files at commit,
   next to ``digest_files`` alone on the same files: the checksum's share of the save.

    python benchmarks/checkpoint_checksums.py [--mb 512] [--save-mb 256] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib

import numpy as np
import xxhash


def _best(fn, data: bytes, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - started)
    return min(times)


def digest_speed(mb: int) -> dict[str, float]:
    data = np.random.default_rng(0).integers(0, 256, mb << 20, dtype=np.uint8).tobytes()
    gb = len(data) / 1e9
    algorithms = {"xxh3_64": lambda d: xxhash.xxh3_64(d).hexdigest(), "crc32 (zlib)": zlib.crc32,
                  "sha256": lambda d: hashlib.sha256(d).hexdigest()}
    return {name: _best(fn, data) / gb for name, fn in algorithms.items()}


def save_share(save_mb: int, folder: str) -> dict[str, float]:
    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_align.training.checkpoint import CheckpointManager
    from megatron_align.training.checksums import digest_files

    if not torch.cuda.is_available():
        from megatron_align.parallel import cpu

        cpu.activate()  # the project's CPU shim for Megatron-Core's cuda calls (as `train` on CPU)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        numel = (save_mb << 20) // 4 // 8
        state = {f"layer{i}": ShardedTensor.from_rank_offsets(f"layer{i}", torch.randn(numel), replica_id=0)
                 for i in range(8)}
        with tempfile.TemporaryDirectory(dir=folder) as root:
            manager = CheckpointManager(root, keep_last=2, keep_every=None, async_save=False)
            started = time.perf_counter()
            manager.save(1, state, {"note": "benchmark"})
            save_s = time.perf_counter() - started
            path = os.path.join(root, "iter_0000001")
            names = [n for n in os.listdir(path) if n != "megatron_align.json"]
            size = sum(os.path.getsize(os.path.join(path, n)) for n in names)
            started = time.perf_counter()
            digest_files(path, names)
            digest_s = time.perf_counter() - started
            manager.close()
    finally:
        dist.destroy_process_group()
    return {"size_gb": size / 1e9, "save_s": save_s, "digest_s": digest_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--save-mb", type=int, default=256)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    speeds = digest_speed(args.mb)
    print(f"digest of a {args.mb} MB buffer on one core (best of 3):")
    for name, s_per_gb in speeds.items():
        print(f"  {name:14s} {s_per_gb:7.3f} s/GB  ({1 / s_per_gb:6.2f} GB/s)  "
              f"{s_per_gb / speeds['xxh3_64']:5.1f}x xxh3")
    share = save_share(args.save_mb, args.dir)
    print(f"CheckpointManager.save of {share['size_gb']:.3f} GB into {args.dir} (sync, 1 rank, digest included): "
          f"{share['save_s']:.2f} s; digest_files alone on its files: {share['digest_s']:.2f} s "
          f"({share['digest_s'] / share['size_gb']:.3f} s/GB from page cache) = "
          f"{100 * share['digest_s'] / share['save_s']:.1f} % of the save")


if __name__ == "__main__":
    main()
