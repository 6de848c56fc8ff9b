#!/usr/bin/env bash
# GPU call (~5 min, carry .gpu .ab_old): the dK/dV kernel with lse₂ and Δ folded into its
# products' initial accumulators (32 registers fewer at its peak) against the tree before
# (.ab_old = `git archive 29c0df7`), causal 1x8192 and 1x32768, with ptxas's spill report:
# the new kernel at 240/24 (default) and 232/40, the old one at 240/24.
# Output: $OUT/{new,old}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
export MOSAIC_GPU_DUMP_PTXAS=1
logged new timeout 200 python3 scripts/check_mgpu_attention.py --shapes 1x8192,1x32768 \
  --variants default,"bwd r232" --no-cudnn
cd .ab_old
export PYTHONPATH=$PWD/scripts:$PWD
logged old timeout 110 python3 scripts/check_mgpu_attention.py --shapes 1x8192,1x32768 \
  --variants default --no-cudnn
