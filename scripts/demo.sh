#!/usr/bin/env bash
# Installs everything, then trains one model through the whole stack and prints its progress.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh demo
exec .venv/bin/python -m scripts.demo "$@"
