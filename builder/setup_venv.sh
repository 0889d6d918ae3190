#!/usr/bin/env bash
# Create .venv with everything the worker and its tests need: Python 3.12, torch, Axolotl
# and every pin of builder/constraints.txt (the versions the image runs).
# torch goes first: otherwise pip may pick another torch build than the pinned one.
set -euo pipefail
cd "$(dirname "$0")/.."
WANT=3.12

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" "python$WANT" python3; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != ($WANT))" 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then  # pyenv's Python, installed but not on PATH
    candidate="$(ls -d "$(pyenv root)"/versions/$WANT*/bin/python$WANT 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$candidate" ] && { echo "$candidate"; return 0; }
  fi
  return 1
}

if ! PYTHON="$(find_python)"; then
  cat >&2 <<MSG
setup_venv: Python $WANT is needed (Axolotl 0.20 and later require it) and none was found
(tried \$PYTHON, python$WANT, python3 and pyenv). Install it, then run make install again:
  Debian/Ubuntu:  apt-get install python$WANT python$WANT-venv   (or the deadsnakes PPA)
  pyenv:          pyenv install $WANT
  macOS:          brew install python@$WANT
or point PYTHON at one: PYTHON=/path/to/python$WANT make install
MSG
  exit 1
fi
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import sys; sys.exit(sys.version_info[:2] != ($WANT))"; then
  echo "setup_venv: .venv is not Python $WANT; creating it again" >&2
  rm -rf .venv
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip
pip install -q -c builder/constraints.txt torch
pip install -q -c builder/constraints.txt \
    -r builder/requirements-axolotl.txt \
    -r builder/requirements.txt \
    -r builder/requirements-dev.txt \
    -e .
# llama.cpp's GGUF converter for `export:` (pinned, hash-checked; kept when already there)
.venv/bin/python builder/install_llama_cpp.py .venv/share/llama.cpp
