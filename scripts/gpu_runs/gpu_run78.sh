#!/usr/bin/env bash
# GPU call (~4 min, carry .gpu): the launch orders' crossover, second part. gpu_run77 measured
# heads first 5% faster fwd+bwd at 4x4096 (128 CTAs per head; cuDNN 442, heads 461, tiles 438
# TFLOP/s), then its float32 reference ran out of memory at 2x8192 (fixed: it now stops at 8
# GiB of scores). Here both orders at 8x2048 and 2x4096 (batch > 1, 128 and 64 CTAs per head),
# 2x8192 and 1x16384 (128). Output: $OUT/crossover.log.
set -u
source scripts/gpu_env.sh
timeout 560 python3 scripts/check_mgpu_attention.py --shapes 8x2048,2x4096,2x8192,1x16384 \
  --variants "heads first","tiles first" 2>&1 | q | tee $OUT/crossover.log
