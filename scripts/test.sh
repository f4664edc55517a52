#!/usr/bin/env bash
# Set up everything, then run the whole test suite (including the slow crash test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${ZHIKU_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
