#!/usr/bin/env bash
# Print the path of a working Python X.Y interpreter, or fail loudly (exit 1) naming what was tried.
#   tools/find_python.sh 3.12
# Order: $PYTHON_<X><Y> (e.g. PYTHON_312=/opt/py/bin/python3.12), pythonX.Y on PATH (a pyenv shim that
# refuses is skipped: every candidate must run and report X.Y), pyenv's installed X.Y.*, uv's managed
# X.Y, the usual system paths.
set -uo pipefail
want="${1:?usage: find_python.sh X.Y}"
var="PYTHON_${want/./}"
tried=()
works() { [ -n "$1" ] && [ -x "$1" ] && [ "$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; }
candidates=("${!var:-}" "$(command -v "python$want" 2>/dev/null)")
if command -v pyenv >/dev/null 2>&1; then
  root="$(pyenv root 2>/dev/null)"
  for d in "$root/versions/$want".*; do [ -d "$d" ] && candidates+=("$d/bin/python$want"); done
fi
if command -v uv >/dev/null 2>&1; then candidates+=("$(uv python find "$want" 2>/dev/null)"); fi
candidates+=("/usr/bin/python$want" "/usr/local/bin/python$want" "/opt/conda/bin/python$want")
for c in "${candidates[@]}"; do
  [ -z "$c" ] && continue
  if works "$c"; then "$c" -c "import sys; print(sys.executable)"; exit 0; fi  # a shim resolves to its interpreter
  tried+=("$c")
done
echo "error: no working Python $want found (tried: \$$var ${tried[*]:-nothing on PATH}). Install it (e.g. \`pyenv install $want\`) or set $var=/path/to/python$want." >&2
exit 1
