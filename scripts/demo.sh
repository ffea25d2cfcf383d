#!/usr/bin/env bash
# The README's main job: sets up .venv if needed, then runs the demo (or `fedjax-sync ARGS`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
.venv/bin/pip install --quiet -e .
exec .venv/bin/fedjax-sync "$@"
