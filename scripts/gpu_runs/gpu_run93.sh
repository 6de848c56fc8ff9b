#!/usr/bin/env bash
# Ran at 8f6e2d7 (2026-11-30, eighth session); fused_dq_warpgroup=0 was 7% slower at 1x32768
# and was removed (reverted in the next commit). Raw output: scripts/results/h200-2026-11-30-s8/run93/.
# GPU call (~5 min, carry .gpu; 2026-11-30, eighth session): the fused backward with its dQ
# product moved to warpgroup 0 (fused_dq_warpgroup=0: P, dV and the previous step's dQ there;
# dpT, dS and dK on warpgroup 1), against the fused default and the two kernels. Offline SASS at
# 1x32768: hot loops of ~665 instructions (32 wgmmas, 9 local loads) and ~475 (24 wgmmas, 3).
# Output: $OUT/dq0_{32k,2k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
logged dq0_32k timeout 180 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --variants "default,fused,fused dq0"
logged dq0_2k timeout 100 python3 scripts/check_mgpu_attention.py --shapes 2x2048 --no-cudnn \
  --variants "fused dq0,fused"
