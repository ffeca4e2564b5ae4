#!/usr/bin/env bash
# The whole test suite with its own set-up: environment, format, lint, types, tests, coverage gate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh test
export PATH="$PWD/.venv/bin:$PATH"
ruff format --check .
ruff check .
mypy
rm -f .coverage .coverage.*
coverage run -m pytest "$@"
coverage combine --quiet
coverage report
