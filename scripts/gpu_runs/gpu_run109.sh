#!/usr/bin/env bash
# GPU call (~4 min, carry .gpu; 2026-12-01, eleventh session): the fused backward's dQ stage in
# 32-byte swizzled rows (commit b583a4d) against 128-byte rows (dd39152's kernels, carried in
# .gpu/old_tree), same call, 1x32768, fused forced; then 2x2048 (errors against float32 on the
# GPU: the stage's layout reaches the TMA reduce-add only there, not in the interpreter).
# Offline (scripts/ptxas_report.py --sass, 1x32768): warpgroup 1's hot loops ~427 instructions
# (~495 before: the 64 register swaps of the store are gone), 0 local loads, one TMA per step.
# Output: $OUT/{new,old}_32k.log, $OUT/new_2k.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
old() { env PYTHONPATH=$PWD/.gpu/old_tree:$PYTHONPATH "$@"; }
logged new_32k timeout 100 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --no-cudnn --variants "fused"
logged old_32k old timeout 100 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --no-cudnn --variants "fused"
logged new_2k timeout 60 python3 scripts/check_mgpu_attention.py --shapes 2x2048 \
  --no-cudnn --variants "fused"
cat $OUT/summary.txt
