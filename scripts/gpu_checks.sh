#!/usr/bin/env bash
# The GPU checks of issue 5 as one prepared run (at most 9 min 5 s of step limits on an H100/H200), for a session that
# is lent a GPU: the compiled-kernel tests, the per-kernel block-size sweep and the routed-op
# benchmark at batch 128 in bf16 and fp32. Uses the machine's own python3 (torch + triton) with the
# repository on PYTHONPATH; installs nothing.
#
#   bash scripts/gpu_checks.sh [OUT_DIR]     (default: $OUT, else benchmarks/results)
#
# Every step has its own time limit and the script goes on after a failing step; the log and the
# result files land in OUT_DIR. Copy its *.json / *.png into benchmarks/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
log="$out/gpu_checks_log.txt"
: >"$log"

step() {   # step NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$log"
}

# Most important first: the headline benchmark (it also checks every implementation against the
# reference: max_abs_diff_vs_reference), then the GPU tests, fp32, and the block sweep last (it
# saves its JSON after every candidate, so its time limit loses nothing measured).
step device 45 "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
# writes moa_routing_cuda_b128_bfloat16.{json,png} and moa_routing_cuda_b128_float32.{json,png}
step routing-bf16 110 "$PY" benchmarks/moa_routing.py --device cuda --batch 128 --dtype bfloat16 --out "$out"
step gpu-tests 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton.py
step routing-fp32 90 "$PY" benchmarks/moa_routing.py --device cuda --batch 128 --dtype float32 --out "$out"
step block-sweep 120 "$PY" benchmarks/moa_block_sweep.py --device cuda --shapes vision --out "$out"
ls -la "$out" | tee -a "$log"
