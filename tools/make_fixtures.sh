#!/usr/bin/env bash
# Regenerate every reference fixture under crates/pipeline/tests/fixtures.
#
# Runs tools/make_tiny_models.py first (other scripts, e.g. make_single_file.py,
# read the tiny model folders), then every other tools/make_*.py in name order,
# each from the repository root with no arguments.
#
# Usage:
#   tools/make_fixtures.sh                 # current python3, after pip install -r tools/requirements.txt
#   tools/make_fixtures.sh --venv DIR      # create/reuse a virtualenv in DIR and install there
#   tools/make_fixtures.sh --no-install    # current python3 as is (versions are only checked)
# Environment: PYTHON (default python3), PIP_ARGS (extra pip arguments, e.g. a CPU wheel index).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV=""
INSTALL=1
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV="$2"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [ -n "$VENV" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    PY="$VENV/bin/python"
fi
if [ "$INSTALL" = 1 ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q -r tools/requirements.txt ${PIP_ARGS:-}
fi

# The references are only meaningful for the pinned versions.
"$PY" - <<'PYEOF'
import diffusers, torch, transformers
assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
PYEOF

scripts=(tools/make_tiny_models.py)
for s in tools/make_*.py; do
    [ "$s" = tools/make_tiny_models.py ] || scripts+=("$s")
done
for s in "${scripts[@]}"; do
    echo "=== $s"
    "$PY" "$s"
done
echo "fixtures:"
du -sh crates/pipeline/tests/fixtures
