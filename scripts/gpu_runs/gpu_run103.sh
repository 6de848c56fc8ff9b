#!/usr/bin/env bash
# GPU call (~7 min, carry .gpu; 2026-12-01, eleventh session): the fused backward's dS taken as
# a bfloat16 product (p ⊙ bf16(dp) in bf16 pairs, _scale_by_probabilities) against the tree
# before (efe27c3's pallas_kernels, .gpu/old_tree) and against the same plus dQ's product split
# into two 64-column parts, the first staged and reduce-added while the second runs
# (.gpu/tree_ab), all at 1x32768 in one call. Offline (scripts/ptxas_report.py --sass, 1x32768):
# warpgroup 1's hot loops ~495 instructions, 0 local loads (before ~625, 0-2); with the split
# ~587, 22-25 local loads (its wgmma descriptors spill).
# Output: $OUT/{new,old,ab}_32k.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
old() { env PYTHONPATH=$PWD/.gpu/old_tree:$PYTHONPATH "$@"; }
ab() { env PYTHONPATH=$PWD/.gpu/tree_ab:$PYTHONPATH "$@"; }
logged new_32k timeout 200 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --variants "fused,default"
logged old_32k old timeout 110 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --no-cudnn --variants "fused"
logged ab_32k ab timeout 110 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --no-cudnn --variants "fused"
cat $OUT/summary.txt
