#!/usr/bin/env bash
# GPU call (~4 min, carry .gpu; 2026-11-30, eighth session): the fused backward's register split
# (P / dS / memory warpgroups) 232/248/24 against 240/240/24, at 1x32768 and 2x2048 beside the
# two-kernel default (gpu_run91 timed out at 2x2048 before reaching 240/240/24).
# Output: $OUT/split_{32k,2k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
logged split_32k timeout 170 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --variants "default,fused,fused r240"
logged split_2k timeout 150 python3 scripts/check_mgpu_attention.py --shapes 2x2048 --no-cudnn \
  --variants "fused r240,fused"
