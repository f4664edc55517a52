#!/usr/bin/env bash
# Set up zhiku on a fresh machine: a virtual environment with everything installed
# and the bundled models prepared. Safe to run again (it only does what is missing).
#
#   ZHIKU_VENV   where the virtual environment goes (default: .venv)
#   ZHIKU_TORCH  the torch requirement (default: torch==2.13.0, the CPU build on this
#                kind of machine). GPU users: install a CUDA build of torch into the
#                venv first (see README), then run this script; it keeps that torch.
#   ZHIKU_CONSTRAINTS  pip constraints for the fast-moving libraries (default:
#                scripts/constraints.txt, the versions the tests last passed with);
#                set it empty to take the newest versions pyproject.toml allows.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ZHIKU_VENV:-.venv}"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
CONSTRAINTS="${ZHIKU_CONSTRAINTS-scripts/constraints.txt}"
[ -z "$CONSTRAINTS" ] || PIP+=(-c "$CONSTRAINTS")

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing ${ZHIKU_TORCH:-torch==2.13.0}"
    "${PIP[@]}" "${ZHIKU_TORCH:-torch==2.13.0}"
fi
echo "[setup] installing zhiku and its dependencies"
"${PIP[@]}" -e ".[dev]"
echo "[setup] preparing the bundled models"
"$VENV/bin/python" -m cli.prepare
echo "[setup] done: activate with 'source $VENV/bin/activate'"
