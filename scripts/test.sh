#!/usr/bin/env bash
# Set up (see setup_env.sh) and run the whole test suite, slow full-size checks included.
# Plain `pytest` runs the quick default (slow tests deselected).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
exec "${PYTHON:-python3}" -m pytest -m "slow or not slow" "$@"
