#!/usr/bin/env bash
# Install petl_tpr (editable) with the given extras into the current Python, keeping its torch.
#
# - With no torch installed, installs torch==2.13.0 (on this machine kind that is a local CPU
#   wheel; from PyPI it would be a CUDA build of several GB).
# - With a torch installed (CPU or CUDA), pins it, and pins torchvision to the matching release,
#   so that no dependency (timm, open_clip_torch, peft) can replace it.
# Usage: bash scripts/setup_env.sh [extras]   (default extras: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-dev}
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  "${PIP[@]}" torch==2.13.0
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" - "$constraints" <<'PYEOF'
import importlib.metadata as md, sys, torch
base = torch.__version__.split("+")[0]
major, minor = (int(x) for x in base.split(".")[:2])
lines = [f"torch=={base}"]
try:
    lines.append(f"torchvision=={md.version('torchvision').split('+')[0]}")
except md.PackageNotFoundError:
    lines.append(f"torchvision==0.{minor + 15}.*")  # torchvision 0.(m+15) pairs with torch 2.m
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("[setup] keeping", ", ".join(lines))
PYEOF

echo "[setup] installing petl_tpr[$EXTRAS]"
"${PIP[@]}" -c "$constraints" -e ".[$EXTRAS]"
