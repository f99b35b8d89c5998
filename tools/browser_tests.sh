#!/usr/bin/env bash
# The web page's tests in a real headless Chromium (crates/server/tests/browser/test_page.py).
# Installs what it needs: Debian's chromium (apt) and Playwright + pytest (PyPI, pinned) in a venv
# under target/; runs against target/debug/sdserve (built by `cargo test`) unless SDSERVE_BIN is set.
#   tools/browser_tests.sh [pytest args...]     SCREENSHOTS=docs/screenshots to refresh README's pictures
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if ! command -v chromium >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
venv=target/browser-venv
if [ ! -x "$venv/bin/pytest" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r crates/server/tests/browser/requirements.txt
fi
# PREPARE_ONLY=1: install, then stop (.ci/run fetches while it compiles).
[ "${PREPARE_ONLY:-}" = 1 ] && exit 0
export SDSERVE_BIN=${SDSERVE_BIN:-$PWD/target/debug/sdserve}
[ -x "$SDSERVE_BIN" ] || cargo build -p sdserve --locked
export CHROMIUM=${CHROMIUM:-$(command -v chromium)}
exec "$venv/bin/pytest" -q crates/server/tests/browser "$@"
