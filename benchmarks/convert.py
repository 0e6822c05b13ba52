"""Conversion time and peak RSS, both ways, for a random Llama generated on the fly (issue 6).

    python benchmarks/convert.py                 # ~1.24B parameters (Llama-3.2-1B shape), bf16
    python benchmarks/convert.py --size 300m     # a smaller shape when the 1B run is too slow for the box

Steps, each in a fresh interpreter measured with ``os.wait4`` (wall time, CPU time, peak RSS): (1) write a random
HF model (streamed, tensor by tensor); (2) ``convert from-hf`` (builds our GPTModel, saves a Megatron dist
checkpoint); (3) ``convert to-hf`` of that checkpoint; plus a baseline (the same CLI importing everything and
printing ``--help``). This parent process never imports torch: Linux carries a parent's peak RSS into a forked
child's ``ru_maxrss``, so a big parent would inflate every child's number.
Peak RSS is reported next to the model's size and its largest tensor, the two numbers that say whether a
converter streams (to-hf should track the largest tensor; from-hf holds the model by design).
Nothing is kept: the work directory is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SIZES = {  # name -> LlamaDims kwargs (vocab 128256 = Llama 3)
    "1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
               vocab_size=128256, tie_embeddings=True),
    "300m": dict(num_layers=8, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16, num_query_groups=4,
                 vocab_size=128256, tie_embeddings=True),
    "tiny": dict(num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2,
                 vocab_size=1000, tie_embeddings=False),
}


def write_random_hf_model(out: str, size: str, dtype_name: str) -> int:
    """A valid random LlamaForCausalLM directory; returns its weight bytes. Runs in a child process."""
    import torch

    from megatron_align.convert import mapping
    from megatron_align.convert.hf_io import ShardedSafetensorsWriter, llama_config_json, write_json

    dims = mapping.LlamaDims(**SIZES[size])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    os.makedirs(out)
    shapes = mapping.hf_shapes(dims)
    specs = [(name, shapes[name], dtype) for name in mapping.hf_names(dims)]
    writer = ShardedSafetensorsWriter(out, specs, max_shard_bytes=2 * 10**9)
    generator = torch.Generator().manual_seed(0)
    for name, shape, _ in specs:
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=dtype)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        writer.write(name, tensor)
    writer.close()
    write_json(os.path.join(out, "config.json"), llama_config_json(
        dims, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096, dtype=dtype, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, initializer_range=0.02))
    return writer.total_size


def measure(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS bytes) of one command in a fresh process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{output[-3000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b", choices=sorted(SIZES))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--workdir", help="where to write the models (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--generate-only", metavar="DIR", help=argparse.SUPPRESS)  # the child that writes the model
    args = parser.parse_args(argv)
    if args.generate_only:
        print(write_random_hf_model(args.generate_only, args.size, args.dtype))
        return 0

    d = SIZES[args.size]
    element = {"bf16": 2, "fp32": 4}[args.dtype]
    work = tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir)
    cli = [sys.executable, "-m", "megatron_align.cli", "convert"]
    try:
        hf, meg, back = (os.path.join(work, name) for name in ("hf", "meg", "back"))
        generate_s, _, _ = measure(
            [sys.executable, __file__, "--size", args.size, "--dtype", args.dtype, "--generate-only", hf]
        )
        weight_bytes = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf) if f.endswith(".safetensors"))
        num_params = round(weight_bytes / element)  # headers are a few KiB: negligible
        largest_bytes = max(d["vocab_size"] * d["hidden_size"], 2 * d["ffn_hidden_size"] * d["hidden_size"]) * element
        # Baseline: the same interpreter importing the converter (torch, Megatron-Core) and printing --help.
        base_s, base_cpu, base_rss = measure(cli + ["to-hf", "--help"])
        from_s, from_cpu, from_rss = measure(cli + ["from-hf", hf, meg, "--no-progress"])
        to_s, to_cpu, to_rss = measure(cli + ["to-hf", meg, back, "--no-progress"])
        gib = 2**30
        result = {
            "size": args.size, "parameters": num_params, "dtype": args.dtype, "weights_GiB": weight_bytes / gib,
            "largest_tensor_GiB": largest_bytes / gib, "generate_s": generate_s,
            "baseline_s": base_s, "baseline_cpu_s": base_cpu, "baseline_rss_GiB": base_rss / gib,
            "from_hf_s": from_s, "from_hf_cpu_s": from_cpu, "from_hf_peak_rss_GiB": from_rss / gib,
            "to_hf_s": to_s, "to_hf_cpu_s": to_cpu, "to_hf_peak_rss_GiB": to_rss / gib,
            "to_hf_rss_over_weights": to_rss / weight_bytes, "from_hf_rss_over_weights": from_rss / weight_bytes,
        }
        print(f"model: {num_params / 1e9:.3f}B parameters, {args.dtype}, {weight_bytes / gib:.2f} GiB of weights, "
              f"largest tensor {largest_bytes / gib:.2f} GiB (generated in {generate_s:.1f} s)")
        print("| run | wall time | CPU time | peak RSS | peak RSS / weights |\n|---|---:|---:|---:|---:|")
        for label, wall, cpu, rss in (("baseline: import + `--help`", base_s, base_cpu, base_rss),
                                      ("from-hf (HF -> dist checkpoint)", from_s, from_cpu, from_rss),
                                      ("to-hf (dist checkpoint -> HF)", to_s, to_cpu, to_rss)):
            print(f"| {label} | {wall:.1f} s | {cpu:.1f} s | {rss / gib:.2f} GiB | {rss / weight_bytes:.2f}x |")
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
