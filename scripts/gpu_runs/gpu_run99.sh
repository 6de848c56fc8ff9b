#!/usr/bin/env bash
# Ran at 9dbc96b (2026-11-30, tenth session); bwd_dq="fused_shared" was 4-58% slower than "fused"
# at every shape and was removed (BENCHMARKS.md §3). Raw output:
# scripts/results/h200-2026-11-30-s10/run99/.
# GPU call (~9 min, carry .gpu; 2026-11-30, tenth session): the fused backward with dQ's
# product shared by columns (bwd_dq="fused_shared": warpgroup 0 computes and sends dQ's first 64
# columns once warpgroup 1 has posted dS, warpgroup 1 the other 64 issued with dK's product), so
# that warpgroup 1, the critical path, runs 2.5 tile products a step instead of 3. Against
# cuDNN, the default and "fused" in the same call, 2x2048 first (a hang stops the call there).
# Offline at 1x32768 (scripts/ptxas_report.py, 232/248/24): hot loops ~600 instructions and 14
# local loads (warpgroup 1; "fused": ~630 and 5) and ~560 and 10 (warpgroup 0; "fused": ~450, 0).
# Output: $OUT/shared_{2k,32k,8k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
export MOSAIC_GPU_DUMP_PTXAS=1
variants="fused shared,fused shared r240,fused,default"
logged shared_2k timeout 200 python3 scripts/check_mgpu_attention.py --shapes 2x2048 \
  --variants "$variants"
if ! grep -q "fused shared .*TFLOP" $OUT/shared_2k.log; then echo "shared failed at 2x2048: stop"; exit 1; fi
logged shared_32k timeout 300 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --variants "$variants"
logged shared_8k timeout 150 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "$variants"
cat $OUT/summary.txt
