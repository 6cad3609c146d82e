#!/usr/bin/env bash
# The measured state on the lent H200 in device calls of < 10 min: the full-scale bench (with its A/B columns
# and the prefill switches toggled), a 2K-prefill profile by module with kernel resources and the INT2 prefill
# launch sweep (~6 min cold), then
# the GPU tests (a cold machine compiles every kernel first: ~5-8 min; their own call; the CUDA knob tests after them
# were cut at 150 s in session 10, now 220). Each phase has its own
# time limit. Results under $OUT (or ./h200_out): fullscale.json + bench.log, prof_prefill.json + prof.log,
# int2_prefill_sweep.json + .log, timeline.json + .log (decode step), gpu_tests.log.
#   run on the device:  bash scripts/h200_session.sh bench     then:  bash scripts/h200_session.sh tests
#   (and bash scripts/h200_session.sh ab: interleaved A/B of the opt-in prefill switches, ~2 min)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-h200_out}"
mkdir -p "$OUT"
PHASE="${1:-bench}"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$PHASE" = bench ]; then
  timeout 330 python3 -m dsv4lib bench --steps 32 --eager-steps 5 --out "$OUT/fullscale.json" > "$OUT/bench.log" 2>&1
  tail -16 "$OUT/bench.log"
  timeout 150 python3 bench/profile_step.py --batches "" --prefill 2048 --mmlu 32x192 --top 40 --by-module --resources \
      --out "$OUT/prof_prefill.json" > "$OUT/prof.log" 2>&1
  grep -A 14 "== kernel resources" "$OUT/prof.log"; grep "==" "$OUT/prof.log"
  # INT2 prefill launch sweep (incl. the untimed register-capped configs) -> the per-launch table
  timeout 120 python3 bench/bench_kernels.py --prefill-only --reps 5 --out "$OUT/int2_prefill_sweep.json" \
      > "$OUT/int2_prefill_sweep.log" 2>&1
  grep -E "^T=|maxnreg=168" "$OUT/int2_prefill_sweep.log"
  # the graphed b1 / b8 step's kernel timeline (what owns the critical path; kernels/BENCHMARKS.md "Ninth session")
  timeout 150 python3 bench/profile_step.py --batches 1,8 --prefill 256 --mmlu 1x64 --pdl --timeline --top 5 \
      --out "$OUT/timeline.json" > "$OUT/timeline.log" 2>&1
  grep "timeline:" "$OUT/timeline.log"
elif [ "$PHASE" = ab ]; then
  # interleaved A/B (8 rounds each) of the latest prefill switches, each toggled against the default
  for sw in kernels.int2_moe_prefill.ALIGN_KERNEL model.attention.PREFILL_SIDE_STREAM model.moe.PREFILL_SHARED_SIDE; do
    timeout 200 python3 bench/prefill_ab.py --switch "$sw" --rounds 8 --out "$OUT/ab_${sw##*.}.json" 2>&1 | tail -3
  done
else
  timeout 480 python3 -m pytest -q -m gpu tests/ --ignore=tests/test_notebooks.py > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -15
  # device-independent tests of the switches and launch knobs changed last, here on CUDA (the side stream really
  # forks there; the knobs compile for sm_90)
  timeout 220 python3 -m pytest -q tests/test_model_attention_chunks.py tests/test_kernels_int2.py tests/test_kernels_mhc.py \
      tests/test_kernels_moe_step.py tests/test_fullscale_static.py tests/test_model_moe_hooks.py tests/test_kernels_fp8_mxfp4.py \
      tests/test_kernels_int2_idp.py \
      -k "side_stream or shared_expert_branch or align or hc_pre or router or attention or fp8 or deferred or early" \
      > "$OUT/optin_tests.log" 2>&1
  tail -2 "$OUT/optin_tests.log"
fi
