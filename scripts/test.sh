#!/usr/bin/env bash
# Set up .venv (when missing) and run the test suite.
#   bash scripts/test.sh           default suite + docstring examples (what CI runs; < 15 min on 2 cores)
#   bash scripts/test.sh --slow    only the slow tests (real pretrained models at scale)
#   bash scripts/test.sh -k relu   extra arguments go to pytest (docstring examples then skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider)
if [ "${1:-}" = "--slow" ]; then
    shift
    exec "${PYTEST[@]}" -m slow "$@"
fi
if [ "$#" -gt 0 ]; then
    exec "${PYTEST[@]}" "$@"
fi
"${PYTEST[@]}"
# Every public docstring example is run too (a separate session: `passes/` and `export/` are
# imported by path there, and must not share a registry with the installed surgeon.passes).
"${PYTEST[@]}" -q --doctest-modules surgeon passes export \
    -o doctest_optionflags="ELLIPSIS NORMALIZE_WHITESPACE" -o testpaths=
