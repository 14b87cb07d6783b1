#!/usr/bin/env bash
# Issue 16: every measurement, today's path and the fast path side by side (benchmarks/gpu_suite.py).
# On the lent H100 (about 6 min, see gpu_suite.py's docstring for the estimate):
#     bash benchmarks/gpu_suite.sh                  # writes suite.md and suite.json under $OUT
# On a CPU, every part at toy size (about 3 min on 2 cores):
#     bash benchmarks/gpu_suite.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="$(command -v python3 || command -v python)"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
"$PY" benchmarks/gpu_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/suite.log"
