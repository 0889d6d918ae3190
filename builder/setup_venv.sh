#!/usr/bin/env bash
# Create .venv with everything the worker and its tests need (about 5 minutes).
# torch goes first: otherwise pip may pull a newer CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -c builder/constraints.txt \
    -r builder/requirements-axolotl.txt \
    -r builder/requirements.txt \
    -r builder/requirements-dev.txt \
    -e .
