#!/usr/bin/env bash
# The plugin's GPU path on one GPU, as one command (under 8 minutes on one H100/H200-class GPU):
#   1. the CUDA tests (streams, events, pinned staging, the shared-memory arena, cuda:1 when present, the
#      diffusers driver, Wan's shape), which CPU-only runs skip;
#   2. benchmarks/overhead.py at Wan2.1-1.3B's shape on CUDA with 10, 1e3 and 1e4 banked frames, prefetch on
#      (the default), then 1e4 with prefetch off: JSON lines with per-chunk p50/p99 against memory-free in the
#      same run (overhead_pct), before_ms, loads_per_chunk, and how loads reached the GPU (frames_direct: from
#      the registered arena; frames_staged / frames_pageable). Goal: memflow_* at 1e4 within 5% of `none`.
# Each step has a timeout (180 + 220 + 70 s: under 8 minutes in all), so a hung GPU never hangs the check.
# Usage: benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter, OUT_DIR=... for results)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA GPU')"
"$PY" -c "import torch; print('gpu_check:', torch.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'device(s)')"
start=$(date +%s)

echo "== CUDA tests" >&2
timeout 180 "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider \
    tests/plugin/test_plugin_cuda.py tests/plugin/test_diffusers_wan.py tests/gpu

echo "== overhead at Wan's shape (prefetch on)" >&2
BENCH=(benchmarks/overhead.py --model wan_1_3b_shape --device cuda --modes none,fixed,memflow_local,memflow_shm
       --rounds 2 --chunks-per-round 4 --out "$OUT")
timeout 220 "$PY" "${BENCH[@]}" --bank-sizes 10,1000,10000 --prefetch
cp "$OUT/overhead.jsonl" "$OUT/overhead_wan_cuda_prefetch.jsonl"
echo "== overhead at Wan's shape, 1e4 frames, prefetch off" >&2
timeout 70 "$PY" "${BENCH[@]}" --bank-sizes 10000 --modes none,memflow_shm
cp "$OUT/overhead.jsonl" "$OUT/overhead_wan_cuda_no_prefetch.jsonl"
echo "gpu_check: done in $(( $(date +%s) - start )) s; rows in $OUT/overhead_wan_cuda_*.jsonl" >&2
