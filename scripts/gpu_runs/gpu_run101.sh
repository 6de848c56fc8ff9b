#!/usr/bin/env bash
# GPU call (~8 min, carry .gpu; 2026-11-30, tenth session): the fused backward with warpgroup 1
# storing dS to shared memory (for the dQ product) while dK's product runs, instead of before
# issuing it, against the tree before (ca57c89's pallas_kernels, carried in .gpu/old_tree), same
# call. Offline at 1x32768 (scripts/ptxas_report.py --sass): warpgroup 1's hot loops ~625
# instructions with 0-2 local loads (before: ~630 with 5-9), the stmatrix stores and fences
# between dK's wgmmas and their wait; spills 340/976 B (before 400/1204).
# Output: $OUT/{new,old}_{32k,8k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
old() { env PYTHONPATH=$PWD/.gpu/old_tree:$PYTHONPATH "$@"; }
logged new_32k timeout 200 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --variants "fused,default"
logged old_32k old timeout 110 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --no-cudnn --variants "fused"
logged new_8k timeout 100 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "fused"
logged old_8k old timeout 70 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --no-cudnn --variants "fused"
cat $OUT/summary.txt
