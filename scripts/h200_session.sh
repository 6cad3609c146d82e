#!/usr/bin/env bash
# One device call that re-establishes the measured state on the lent H200 (~7-9 min cold): the full-scale
# bench (with its A/B columns and the prefill switches toggled), the GPU tests, a 2K-prefill profile by
# module. Each phase has its own time limit so a slow one cannot starve the next. Results under $OUT (or
# ./h200_out): fullscale.json + bench.log, gpu_tests.log, prof_prefill.json + prof.log.
#   run on the device:  bash scripts/h200_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-h200_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 300 python3 -m dsv4lib bench --steps 32 --eager-steps 2 --out "$OUT/fullscale.json" > "$OUT/bench.log" 2>&1
tail -16 "$OUT/bench.log"
timeout 180 python3 -m pytest -q -m gpu tests/ --ignore=tests/test_notebooks.py > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
timeout 90 python3 bench/profile_step.py --batches "" --prefill 2048 --mmlu 32x192 --top 40 --by-module --resources \
    --out "$OUT/prof_prefill.json" > "$OUT/prof.log" 2>&1
grep -A 12 "== kernel resources" "$OUT/prof.log"; grep "==" "$OUT/prof.log"
