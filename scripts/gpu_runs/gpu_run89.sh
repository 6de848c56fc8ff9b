#!/usr/bin/env bash
# GPU call (~2 min, carry .gpu): where the Mosaic backward's time goes beyond its two kernels
# (gpu_run88 at 1x32768: backward 46.18 ms, dK/dV 26.48 + dQ 18.97 = 45.45 ms timed apart):
# the Δ reduction alone and both kernels in one jit, beside the per-kernel times.
# Output: $OUT/gap.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
logged gap timeout 200 python3 scripts/check_mgpu_attention.py --shapes 2x2048,1x32768 \
  --variants default --no-cudnn
grep -E "Δ|==|kernel" $OUT/gap.log >> $OUT/summary.txt
