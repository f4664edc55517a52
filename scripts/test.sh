#!/usr/bin/env bash
# Set up everything, then run the whole test suite (including the slow crash test).
# The page's browser tests need a Chromium: Debian's package is installed when missing and
# this runs as root (elsewhere, without one, those tests skip and say why).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing chromium for the page's browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk) >/dev/null \
        || echo "[test] could not install chromium: the browser tests will skip"
fi
exec "${ZHIKU_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
