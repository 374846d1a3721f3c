#!/usr/bin/env bash
# Set up .venv (when missing) and run the test suite.
#   bash scripts/test.sh           default suite (what CI runs; < 15 min on 2 cores)
#   bash scripts/test.sh --slow    only the slow tests (real pretrained models at scale)
#   bash scripts/test.sh -k relu   extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
MARK=()
if [ "${1:-}" = "--slow" ]; then
    shift
    MARK=(-m slow)
fi
exec .venv/bin/python -m pytest "${MARK[@]}" "$@"
