#!/usr/bin/env bash
# Set up (see setup_env.sh) and run the project's main job: the synthetic-domain transfer demo
# (petl-tpr demo; options pass through, e.g. --quick, --backbone open_clip, --fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
exec "${PYTHON:-python3}" -m petl_tpr demo "$@"
