#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 found on this machine (PATH first, then pyenv; 3.12 preferred, the
# version the GPU image and megatron-core are tested with) and install
# megatron-rcm with the extras given (default: dev). Usage: bash scripts/setup.sh [EXTRAS]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"

find_python() {
  local c v
  for c in python3.12 python3 python3.13 python3.14 python; do
    if command -v "$c" >/dev/null 2>&1; then
      v=$("$c" -c 'import sys; print(int(sys.version_info >= (3, 12)))' 2>/dev/null || echo 0)
      if [ "$v" = 1 ]; then command -v "$c"; return 0; fi
    fi
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  for c in $(ls -d "$root"/versions/3.1[2-9]* "$root"/versions/3.[2-9][0-9]* 2>/dev/null | sort -V); do
    if [ -x "$c/bin/python3" ]; then echo "$c/bin/python3"; return 0; fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
  py=$(find_python) || { echo "error: no Python >= 3.12 found (PATH or pyenv); install one first" >&2; exit 1; }
  echo "using $py ($("$py" --version))"
  rm -rf .venv
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "megatron-rcm installed in .venv ($(.venv/bin/python --version))"
