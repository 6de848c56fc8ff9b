#!/usr/bin/env bash
# GPU call (~5 min, carry .gpu): where the launch orders cross over. gpu_run76 measured tiles
# first 15% / 6% faster fwd+bwd at 2x2048 / 1x8192 (32 / 64 CTAs per head) and 1.7% slower at
# 1x32768 (256). Here both orders, per kernel, beside cuDNN, at 128 CTAs per head in three ways
# (4x4096, 2x8192, 1x16384) and at 192 (1x24576), to place MgpuAttentionConfig's "auto" rule.
# Output: $OUT/crossover.log.
set -u
source scripts/gpu_env.sh
timeout 560 python3 scripts/check_mgpu_attention.py --shapes 4x4096,2x8192,1x16384,1x24576 \
  --variants "heads first","tiles first" 2>&1 | q | tee $OUT/crossover.log
