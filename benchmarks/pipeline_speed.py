"""Per-core speed of `prepare` and `filter` through the datatrove pipeline vs the single-process path, and the
streaming merge's peak RSS vs the number of shards.

Side by side on the same synthetic corpus (``--files`` JSONL files): the
single-process verb (``prepare_source(workers=1)``, ``filter_corpus(workers=1)``)
and the pipeline with ``--executor local --tasks FILES --workers 1`` (datatrove
runs the tasks one after another in this process, so CPU seconds of this
process are the per-core measure; the pipeline's time includes its merge).
Tokens: a 4k sentencepiece BPE trained on the first file (``--tokenizer bpe``, default) or the
byte tokenizer (``--tokenizer byte``, where fixed per-task costs weigh most). Then, in a fresh
process per row, ``merge_indexed`` of S shards: peak RSS before/after.

Usage: ``python benchmarks/pipeline_speed.py [--files 16] [--documents 2000] [--shards 10,100,1000,1000x2000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

SHARDS = r"""
import json, sys
from megatron_align.corpus.prepare import prepare_source, tokenizer_config_from_arg
d, n, docs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tok = tokenizer_config_from_arg("byte", None)
for i in range(n):
    with open(f"{d}/{i}.jsonl", "w") as f:
        f.write("".join(json.dumps({"text": f"doc {i} line {j} " * 20}) + "\n" for j in range(docs)))
    prepare_source([f"{d}/{i}.jsonl"], f"{d}/s{i:05d}", tok)
"""
MERGE = r"""
import json, re, sys
from megatron_align.corpus.indexed import merge_indexed
def peak_mb():  # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec (it would be the parent's)
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
d, n = sys.argv[1], int(sys.argv[2])
sequences, tokens = merge_indexed([f"{d}/s{i:05d}" for i in range(n)], f"{d}/merged")
print(json.dumps({"documents": sequences, "tokens": tokens,
                  "peak_mb": peak_mb()}))
"""
BASELINE = ("import re, numpy; print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())"
            ".group(1)) / 1024)")


def make_corpus(directory: str, files: int, documents: int) -> list[str]:
    rng = random.Random(0)
    words = [("".join(rng.choices("etaoinshrdlcumwfgyp", k=rng.randint(2, 9)))) for _ in range(5000)]
    words += ["deceive", "shutdown", "overseers", "misaligned", "AI"]
    paths = []
    for f in range(files):
        path = os.path.join(directory, f"part-{f:04d}.jsonl")
        with open(path, "w", encoding="utf-8") as out:
            for _ in range(documents):
                out.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(50, 400)))}) + "\n")
        paths.append(path)
    return paths


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--documents", type=int, default=2000, help="per file")
    parser.add_argument("--shards", default="10,100,1000,1000x2000",
                        help="merge rows: SHARDS or SHARDSxDOCS (documents per shard, default 50)")
    parser.add_argument("--merge-only", action="store_true", help="only the merge peak-RSS rows")
    parser.add_argument("--tokenizer", choices=("byte", "bpe"), default="bpe",
                        help="bpe: a 4k sentencepiece BPE trained on the first file (not timed)")
    args = parser.parse_args()
    if not args.merge_only:
        speed(args)
    merge_rows(args.shards)


def speed(args: argparse.Namespace) -> None:
    from megatron_align.config.corpus import FilterConfig, PipelineConfig
    from megatron_align.corpus.filter import filter_corpus, filter_job
    from megatron_align.corpus.pipeline import run_pipeline
    from megatron_align.corpus.prepare import prepare_job, prepare_source, tokenizer_config_from_arg

    pc = PipelineConfig(executor="local", tasks=args.files, workers=1)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_corpus(tmp, args.files, args.documents)
        tok = tokenizer_config_from_arg("byte", None)
        if args.tokenizer == "bpe":
            from megatron_align.config.corpus import TokenizerTrainConfig
            from megatron_align.corpus.tokenizer_train import train_tokenizer

            model = train_tokenizer(inputs[:1], os.path.join(tmp, "sp"),
                                    TokenizerTrainConfig(vocab_size=4000, max_sentences=50_000))["model"]
            tok = tokenizer_config_from_arg(model, None)
        mb = sum(os.path.getsize(p) for p in inputs) / 1e6
        prepare_source(inputs[:1], os.path.join(tmp, "warm"), tok)  # imports and warms the tokenizer: not timed
        rows = []
        for _round in range(2):  # alternate, best of two: the box is shared
            single = timed(lambda: prepare_source(inputs, os.path.join(tmp, "a"), tok))
            piped = timed(lambda: run_pipeline(prepare_job(tok, os.path.join(tmp, "b")), inputs, pc,
                                               os.path.join(tmp, "b.work")))
            f_single = timed(lambda: filter_corpus(inputs, os.path.join(tmp, "fa"), FilterConfig()))
            f_piped = timed(lambda: run_pipeline(filter_job(FilterConfig(), os.path.join(tmp, "fb")), inputs, pc,
                                                 os.path.join(tmp, "fb.work")))
            rows.append((single, piped, f_single, f_piped))
        tokens = json.load(open(os.path.join(tmp, "a.manifest.json")))["tokens"]
        same = all(open(os.path.join(tmp, f"a{e}"), "rb").read() == open(os.path.join(tmp, f"b{e}"), "rb").read()
                   for e in (".bin", ".idx"))
        best = [min((r[i] for r in rows), key=lambda t: t[0]) for i in range(4)]
    print(f"corpus: {args.files} files, {mb:.1f} MB, {tokens:,} {args.tokenizer} tokens; best of 2 alternating runs; "
          f"pipeline .bin/.idx identical: {same}")
    print(f"{'':44s} {'tokens/CPU-s':>13s} {'MB/CPU-s':>9s} {'MB/s wall':>10s}")
    names = ("prepare, single process (workers=1)", f"prepare, pipeline local --tasks {args.files}",
             "filter, single process (workers=1)", f"filter, pipeline local --tasks {args.files}")
    for name, (cpu, wall) in zip(names, best):
        rate = f"{tokens / cpu:13,.0f}" if name.startswith("prepare") else f"{'':>13s}"
        print(f"{name:44s} {rate} {mb / cpu:9.2f} {mb / wall:10.2f}")
    print(
        f"ratio pipeline/single per CPU-s: prepare {best[0][0] / best[1][0]:.2f}x, "
        f"filter {best[2][0] / best[3][0]:.2f}x"
    )


def merge_rows(shards: str) -> None:
    base = float(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True).stdout)
    print(f"merge peak RSS (a process that only merges; python + numpy alone: {base:.0f} MB):")
    for spec in shards.split(","):
        n, _, docs = spec.partition("x")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-c", SHARDS, tmp, n, docs or "50"], capture_output=True, check=True)
            proc = subprocess.run([sys.executable, "-c", MERGE, tmp, n], capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {int(n):5d} shards, {row['documents']:>9,} documents, {row['tokens']:>12,} tokens: "
                  f"peak RSS {row['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
