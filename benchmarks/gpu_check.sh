#!/usr/bin/env bash
# The plugin's GPU path on one GPU, as one command (under 8 minutes on one H100/H200-class GPU):
#   1. the CUDA tests (streams, events, pinned staging and its budget, the shared-memory arena and a refused
#      registration, cuda:1 when present, the diffusers driver, Wan's shape), which CPU-only runs skip;
#   2. benchmarks/overhead.py at Wan2.1-1.3B's shape on CUDA with 10, 1e3 and 1e4 banked frames, prefetch on
#      (the default), then 1e4 with prefetch off: JSON lines with per-chunk p50/p99 against memory-free in the
#      same run (overhead_pct), before_ms, loads_per_chunk, and how loads reached the GPU (frames_direct: from
#      the registered arena; frames_staged / frames_pageable). Goal: memflow_* at 1e4 within 5% of `none`.
# Every step has a time limit (tests: 180 s, each test 120 s; benchmarks: 220 + 70 s; under 8 minutes in all):
# a step that fails or runs past its limit is named on stderr and the next step still runs; the exit status
# is non-zero when any step did not pass. Without a CUDA GPU it stops at once and says so.
# Usage: benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter, OUT_DIR=... for results)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT" || exit 1
timeout 120 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA GPU')" \
    || { echo "gpu_check: no usable CUDA GPU (or torch did not answer within 120 s); nothing was run" >&2; exit 2; }
"$PY" -c "import torch; print('gpu_check:', torch.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'device(s)')"
start=$(date +%s)
failed=()

step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit; a failure or a timeout is named, not fatal
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)" >&2
    local began=$(date +%s)
    timeout --kill-after=15 "$limit" "$@"
    local rc=$? took=$(( $(date +%s) - began ))
    if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$took" -ge "$limit" ]; then
        echo "gpu_check: '$name' ran past its ${limit} s limit and was stopped" >&2
    elif [ "$rc" -eq 137 ]; then
        echo "gpu_check: '$name' was killed after ${took} s (SIGKILL from outside: out of memory?)" >&2
    elif [ "$rc" -ne 0 ]; then
        echo "gpu_check: '$name' failed (exit status $rc)" >&2
    fi
    [ "$rc" -eq 0 ] || failed+=("$name")
    return "$rc"
}

step "CUDA tests" 180 "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider --timeout 120 \
    tests/plugin/test_plugin_cuda.py tests/plugin/test_diffusers_wan.py tests/gpu

BENCH=(benchmarks/overhead.py --model wan_1_3b_shape --device cuda --modes none,fixed,memflow_local,memflow_shm
       --rounds 2 --chunks-per-round 4 --out "$OUT")
step "overhead at Wan's shape, prefetch on" 220 "$PY" "${BENCH[@]}" --bank-sizes 10,1000,10000 --prefetch \
    && cp "$OUT/overhead.jsonl" "$OUT/overhead_wan_cuda_prefetch.jsonl"
step "overhead at Wan's shape, 1e4 frames, prefetch off" 70 "$PY" "${BENCH[@]}" --bank-sizes 10000 \
    --modes none,memflow_shm && cp "$OUT/overhead.jsonl" "$OUT/overhead_wan_cuda_no_prefetch.jsonl"

echo "gpu_check: done in $(( $(date +%s) - start )) s; rows in $OUT/overhead_wan_cuda_*.jsonl" >&2
if [ "${#failed[@]}" -gt 0 ]; then
    echo "gpu_check: did not pass: ${failed[*]}" >&2
    exit 1
fi
