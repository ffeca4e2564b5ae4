#!/usr/bin/env bash
# Creates .venv and installs the project with the given extra; torch first, pinned to its CPU build.
set -euo pipefail
extra="${1:-demo}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip "setuptools<81" wheel
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet --editable ".[${extra}]"
