#!/usr/bin/env bash
# The whole test suite with its own set-up: environment, format, lint, types, tests, coverage gate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh test
# The Swagger UI test drives Debian's chromium through chromium-driver; CI runs as root and installs them.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "chromium and chromium-driver are missing: the Swagger UI test is skipped (and fails under CI=true)" >&2
  fi
fi
export PATH="$PWD/.venv/bin:$PATH"
ruff format --check .
ruff check .
mypy
rm -f .coverage .coverage.*
coverage run -m pytest "$@"
coverage combine --quiet
coverage report
