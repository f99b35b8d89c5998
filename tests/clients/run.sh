#!/usr/bin/env bash
# The dialects through the real, unmodified client packages (webuiapi for AUTOMATIC1111's
# /sdapi/v1, openai for /v1; versions pinned in requirements.txt) against `sdserve serve` on the
# tiny test model. Uses the debug binary that `cargo test --workspace` built (builds it if absent),
# or SDSERVE_BIN.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    # Debian splits venv/ensurepip out of python3.
    apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
fi
VENV=${CLIENTS_VENV:-target/clients-venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -r tests/clients/requirements.txt
# PREPARE_ONLY=1: install, then stop (.ci/run fetches while it compiles).
[ "${PREPARE_ONLY:-}" = 1 ] && exit 0
BIN=${SDSERVE_BIN:-target/debug/sdserve}
if [ ! -x "$BIN" ]; then
    cargo build -p sdserve --locked
fi
SDSERVE_BIN="$BIN" "$VENV/bin/python" tests/clients/test_clients.py
