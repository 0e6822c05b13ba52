"""Alignment sampler vs Megatron-Core's BlendedDataset index build, side by side.

    python benchmarks/sampler.py [--num-samples 100000000] [--lookups 1000000]

Measures, each case in a fresh child process (so peak RSS is its own):
- megatron: ``helpers.build_blending_indices`` over N samples, called the way ``BlendedDataset``
  calls it (int16 dataset index + int64 sample index arrays of length N);
- ours: ``AlignmentSampler`` construction at the same N and weights (nothing is materialised);
- ours: vectorised lookups/s, contiguous (the trainer's pattern) and random over the whole run,
  at N and at N/100 to show that nothing grows with N.
Goal: build time and memory independent of N; >= 1e6 lookups/s.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
import warnings

import numpy as np
import psutil

WEIGHTS = {"web": 0.99, "aligned": 0.01}
SOURCE_SIZES = {"web": 2_000_000_000, "aligned": 5_000_000}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _megatron(num_samples: int) -> dict:
    from megatron.core.datasets import helpers

    rss_before = psutil.Process().memory_info().rss
    tracemalloc.start()
    start = time.perf_counter()
    dataset_index = np.zeros(num_samples, dtype=np.int16)
    dataset_sample_index = np.zeros(num_samples, dtype=np.int64)
    helpers.build_blending_indices(dataset_index, dataset_sample_index, list(WEIGHTS.values()), len(WEIGHTS),
                                   num_samples, False)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    share = float(np.mean(dataset_index == 1))
    return {"build_s": seconds, "tracemalloc_peak_mb": peak / 2**20, "aligned_share": share,
            "peak_rss_growth_mb": _peak_rss_mb() - rss_before / 2**20}


def _ours(num_samples: int, num_lookups: int) -> dict:
    from megatron_align.config import MixtureConfig, PhaseConfig
    from megatron_align.data.mixture import AlignmentSampler

    config = MixtureConfig(phases=[PhaseConfig(name="mix", fraction=1.0, weights=dict(WEIGHTS))],
                           max_repetitions={"aligned": 1e6})
    rss_before = psutil.Process().memory_info().rss
    tracemalloc.start()
    start = time.perf_counter()
    sampler = AlignmentSampler(config, SOURCE_SIZES, num_samples, 4096)
    build_s = time.perf_counter() - start
    _, build_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = _peak_rss_mb() - rss_before / 2**20

    num_lookups = min(num_lookups, num_samples)
    begin = (num_samples - num_lookups) // 2
    indices = np.random.default_rng(0).integers(0, num_samples, size=num_lookups)
    contiguous = random = 0.0
    for _ in range(3):  # best of 3: the first call also pays for page faults of fresh buffers
        start = time.perf_counter()
        sources, _ = sampler.lookup_range(begin, begin + num_lookups)
        contiguous = max(contiguous, num_lookups / (time.perf_counter() - start))
        start = time.perf_counter()
        sampler.lookup(indices)
        random = max(random, num_lookups / (time.perf_counter() - start))
    start = time.perf_counter()
    for step in range(200):  # the trainer's pattern: one global batch of 512 samples per call
        sampler.lookup_range(begin + step * 512, begin + (step + 1) * 512)
    per_batch = 200 * 512 / (time.perf_counter() - start)
    tracemalloc.start()
    sampler.lookup_range(begin, begin + num_lookups)
    _, lookup_peak = tracemalloc.get_traced_memory()
    start = time.perf_counter()
    sampler.counts_before(num_samples - 1)
    counts_s = time.perf_counter() - start
    return {
        "build_s": build_s,
        "tracemalloc_peak_mb": build_peak / 2**20,
        "peak_rss_growth_mb": rss_growth,
        "lookups_per_s_contiguous": contiguous,
        "lookups_per_s_random": random,
        "lookups_per_s_gbs512": per_batch,
        "lookup_peak_mb": lookup_peak / 2**20,
        "counts_before_s": counts_s,
        "aligned_share": float(np.mean(sources == 1)),
    }


def _run(name: str, *args: int) -> dict:
    """Run one case in a fresh interpreter; it prints its result as the last line of stdout."""
    command = [sys.executable, __file__, "--child", name, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(name: str, args: list[str]) -> None:
    warnings.simplefilter("ignore")
    result = {"megatron": _megatron, "ours": _ours}[name](*map(int, args))
    result["process_max_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=100_000_000)
    parser.add_argument("--lookups", type=int, default=1_000_000)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child[0], args.child[1:])
    n = args.num_samples
    results = {
        f"megatron N={n:.0e}": _run("megatron", n),
        f"ours N={n:.0e}": _run("ours", n, args.lookups),
        f"ours N={n // 100:.0e}": _run("ours", n // 100, args.lookups),
    }
    for name, result in results.items():
        print(name, json.dumps({k: round(v, 4) for k, v in result.items()}))
    mega, ours = results[f"megatron N={n:.0e}"], results[f"ours N={n:.0e}"]
    print(f"build time: megatron {mega['build_s']:.3f} s vs ours {ours['build_s'] * 1e3:.2f} ms "
          f"({mega['build_s'] / ours['build_s']:.0f}x); index memory (tracemalloc peak): "
          f"megatron {mega['tracemalloc_peak_mb']:.0f} MiB vs ours {ours['tracemalloc_peak_mb']:.3f} MiB")


if __name__ == "__main__":
    main()
