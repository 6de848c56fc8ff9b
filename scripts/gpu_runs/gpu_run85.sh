#!/usr/bin/env bash
# GPU call (~4 min, carry .gpu .ab_old; run 2026-11-30, seventh session): the softcapped dK/dV kernel with lse₂
# read after its products (ptxas, offline: spills 232/420 -> 84/188 B, and three of its four
# hot loops free of local memory; BENCHMARKS §3, "Registers without the GPU") against the tree
# before (.ab_old = `git archive e0cc06c`), softcap 50 at 1x8192 and 1x32768, with ptxas's
# spill report.
# Output: $OUT/{new,old}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
export MOSAIC_GPU_DUMP_PTXAS=1
logged new timeout 150 python3 scripts/check_mgpu_attention.py --shapes 1x8192,1x32768 \
  --variants default --no-cudnn --softcap 50
cd .ab_old
export PYTHONPATH=$PWD/scripts:$PWD
logged old timeout 150 python3 scripts/check_mgpu_attention.py --shapes 1x8192,1x32768 \
  --variants default --no-cudnn --softcap 50
