#!/usr/bin/env bash
# One-call GPU check (docs/benchmarks.md "One-call GPU check"). On the GPU machine, from the repository root, with
# ./wheels carried (`make gpu-wheels` beforehand, on a machine with network):
#   benchmarks/gpu_check.sh "$OUT"        # gpu_check.json + at most 6 short logs into $OUT; ~9 minutes at most
#   benchmarks/gpu_check.sh --rehearse [OUT]   # CPU rehearsal here: fresh Python 3.12 venv with torch + the image's
#                                              # packages, the carried wheels, the same stages on a tiny model
# Exit 3 (before installing anything) when Python 3.12, a CUDA torch with a GPU, or the wheels are missing;
# 1 when a stage failed; 0 when all passed. Installs go to a temporary directory, never into $OUT or the image.
set -euo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
repo=$PWD
rehearse=""
if [[ "${1:-}" == "--rehearse" ]]; then rehearse=1; shift; fi
out="${1:-${OUT:-runs/gpu_check}}"
wheels="${WHEELS:-wheels}"
python="${PYTHON:-python3}"
fail() { echo "gpu_check: $*" >&2; exit 3; }
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"

if [[ -n "$rehearse" ]]; then
  # The device image, rebuilt here: Python 3.12 with torch and the image's packages only (benchmarks/gpu_image.txt).
  venv="${REHEARSE_VENV:-${TMPDIR:-/tmp}/gpu_check_rehearse_venv}"
  if [[ ! -x "$venv/bin/python" || ! -f "$venv/.image" ]]; then
    py312="$(tools/find_python.sh 3.12)" || exit 1
    rm -rf "$venv" && "$py312" -m venv "$venv"
    "$venv/bin/python" -m pip install -q -r benchmarks/gpu_image.txt || fail "building the rehearsal venv failed"
    touch "$venv/.image"
  fi
  python="$venv/bin/python"
  start=$(date +%s)  # the device's image is there already: its build is not part of the check's time
  [[ -d "$wheels" ]] || make --no-print-directory gpu-wheels WHEELS="$wheels" || fail "make gpu-wheels failed"
else
  "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' || fail "$python is not Python 3.12 (set PYTHON=...)"
  "$python" -c 'import torch; assert torch.version.cuda, "CPU-only torch"; assert torch.cuda.is_available(), "no CUDA GPU visible"' \
    || fail "needs a CUDA build of torch and a visible GPU (see the assertion above)"
fi
ls "$wheels"/megatron_core-*.whl >/dev/null 2>&1 || fail "no megatron-core wheel in $wheels/: run 'make gpu-wheels' first (and carry wheels/)"

# Only what the machine lacks: a carried wheel whose distribution is already installed is left out, so nothing the
# image brings (numpy, pytest and its plugins, xxhash) is shadowed.
site="$work/site"
mapfile -t missing < <("$python" - "$wheels" <<'PY'
import glob, importlib.metadata as md, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    dist = os.path.basename(path).split("-")[0]
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        print(path)
PY
)
main=(); nvrx=()
for w in "${missing[@]}"; do [[ "$(basename "$w")" == nvidia_resiliency_ext-* ]] && nvrx+=("$w") || main+=("$w"); done
echo "gpu_check: installing ${#main[@]} wheel(s) into $site: ${main[*]##*/}"
if (( ${#main[@]} )); then
  "$python" -m pip install -q --no-index --no-deps --target "$site" "${main[@]}" || fail "installing the wheels failed"
fi
if (( ${#nvrx[@]} )); then  # the 0.7 wheel needs glibc 2.39; where pip refuses it the check says so (resume_nvrx)
  "$python" -m pip install -q --no-index --no-deps --target "$site" "${nvrx[@]}" \
    || echo "gpu_check: the nvidia-resiliency-ext wheel does not install here (glibc?)"
fi
# The working tree's package first (never an installed copy), then the carried wheels.
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
exec "$python" benchmarks/gpu_check.py --out "$out" --work "$work" --start "$start" ${rehearse:+--rehearse}
