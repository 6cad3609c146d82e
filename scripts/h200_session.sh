#!/usr/bin/env bash
# One device call that re-establishes the measured state on the lent H200 (~6 min): the GPU tests, the
# full-scale bench (with its A/B columns, incl. the opt-in prefill attention kernel toggled) and a 2K-prefill
# profile. Results under $OUT (or ./h200_out): gpu_tests.log, fullscale.json + bench.log, prof_prefill.json.
#   run on the device:  bash scripts/h200_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-h200_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests/ --ignore=tests/test_notebooks.py > "$OUT/gpu_tests.log" 2>&1
python3 -m pytest -q tests/test_kernels_int2_idp.py tests/test_kernels_prefill_attention.py tests/test_kernels_mhc.py \
    >> "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
python3 -m dsv4lib bench --steps 32 --eager-steps 2 --out "$OUT/fullscale.json" > "$OUT/bench.log" 2>&1
tail -16 "$OUT/bench.log"
python3 bench/profile_step.py --batches "" --prefill 2048 --mmlu 32x192 --top 45 --out "$OUT/prof_prefill.json" \
    > "$OUT/prof.log" 2>&1
grep "==" "$OUT/prof.log"
