#!/usr/bin/env bash
# Ran at b847562, where "fused tma" and "fused atomic" were bwd_dq="fused-tma" / "fused-atomic"
# (the second, red.global.add from registers, was 1.5x slower and was removed; the first is now
# bwd_dq="fused"). Raw output: scripts/results/h200-2026-11-30-s8/run91/.
# GPU call (~8 min, carry .gpu; 2026-11-30, eighth session): gpu_run90 again after its deadlock.
# gpu_run90 (commit 51afce4) hung in every fused variant: their registers (232 + 256 + 24 and
# 240 + 248 + 24 = 512 per thread) exceeded the 3 x 168 the CTA launches with, and setmaxnreg
# cannot take more than the other warpgroups give back. Now 232 + 248 + 24 by default ("fused
# tma", "fused atomic") and 240 + 240 + 24 ("fused tma r240"); the config refuses more than 504.
# Output: $OUT/fused_{2k,32k,8k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
variants="default,fused tma,fused atomic"
logged fused_2k timeout 180 python3 scripts/check_mgpu_attention.py --shapes 2x2048 \
  --variants "$variants,fused tma r240"
logged fused_32k timeout 200 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --variants "$variants"
logged fused_8k timeout 190 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "$variants"
