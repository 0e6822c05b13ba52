#!/usr/bin/env bash
# One-call GPU check for a single-GPU H100/H200 machine with Python 3.12 + a CUDA build of torch, without
# megatron-core, TE, apex or network (docs/benchmarks.md "One-call GPU check"). Beforehand, on a machine
# with network: `make gpu-wheels` (fills ./wheels, git-ignored). Then, from the repository root:
#   benchmarks/gpu_check.sh [OUT_DIR]          # default runs/gpu_check; at most ~8 minutes
# It fails fast (exit 3, before installing anything heavy) when the GPU, Python 3.12, torch or the wheels
# are missing; exit 1 when a stage failed; 0 when all passed. The summary is OUT_DIR/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check}"
wheels="${WHEELS:-wheels}"
python="${PYTHON:-python3}"
fail() { echo "gpu_check: $*" >&2; exit 3; }

# Preflight with the machine's own interpreter: cheap checks first, so no GPU minute is burnt on a setup
# that cannot finish.
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' || fail "$python is not Python 3.12 (set PYTHON=...)"
"$python" -c 'import torch; assert torch.version.cuda, "CPU-only torch"; assert torch.cuda.is_available(), "no CUDA GPU visible"' \
  || fail "needs a CUDA build of torch and a visible GPU (see the assertion above)"
ls "$wheels"/megatron_core-*.whl >/dev/null 2>&1 || fail "no megatron-core wheel in $wheels/: run 'make gpu-wheels' on a machine with network first"
ls "$wheels"/megatron_align-*.whl >/dev/null 2>&1 || fail "no megatron_align wheel in $wheels/: run 'make gpu-wheels' first"

# The wheels go into OUT/site (pip --target, no network), put first on PYTHONPATH: the machine's torch is used
# wherever it lives (system or a venv), and nothing is installed into the machine's environment.
site="$out/site"
rm -rf "$site" && mkdir -p "$out"
main=()
for w in "$wheels"/*.whl; do [[ "$(basename "$w")" == nvidia_resiliency_ext-* ]] || main+=("$w"); done
"$python" -m pip install -q --no-index --no-deps --target "$site" "${main[@]}" \
  || fail "installing the wheels of $wheels/ into $site failed (see pip's message above)"
# nvidia-resiliency-ext (the async writer megatron-core 0.19 prefers) only where pip accepts its wheel's glibc tag.
if ls "$wheels"/nvidia_resiliency_ext-*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --target "$site" "$wheels"/nvidia_resiliency_ext-*.whl \
    || echo "gpu_check: the nvidia-resiliency-ext wheel does not install here (glibc?); async save uses megatron-core's own"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/gpu_check.py --out "$out"
