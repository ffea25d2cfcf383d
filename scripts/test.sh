#!/usr/bin/env bash
# The README's test command: sets up .venv if needed, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
.venv/bin/pip install --quiet -e '.[test,digits,h5]'
# One pytest worker per CPU core (pytest-xdist): most of the suite's time is XLA
# compilation, which runs on one core per process. FEDJAX_SYNC_TEST_WORKERS=0 runs
# in one process.
exec .venv/bin/python -m pytest -q -n "${FEDJAX_SYNC_TEST_WORKERS:-auto}" "$@"
