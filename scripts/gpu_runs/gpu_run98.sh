#!/usr/bin/env bash
# GPU call (~3 min, carry .gpu; 2026-11-30, ninth session): the backward kernels with each
# step's query head passed statically to the loop body (no integer division per step) against
# the tree before (ebc746b's pallas_kernels, carried in .gpu/old_tree), same call, 1x32768,
# default and fused. Offline: dK/dV spills 176/352 B -> 20/28 B (its masked loops 511-559 ->
# 461-482 instructions, 23-24 -> 0-2 local loads); fused warpgroup 1's loops ~655 -> ~630.
# Output: $OUT/{new,old}_32k.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
logged new_32k timeout 100 python3 scripts/check_mgpu_attention.py --shapes 1x32768 --no-cudnn \
  --variants "default,fused"
logged old_32k env PYTHONPATH=$PWD/.gpu/old_tree:$PYTHONPATH timeout 100 python3 \
  scripts/check_mgpu_attention.py --shapes 1x32768 --no-cudnn --variants "default,fused"
cat $OUT/summary.txt
