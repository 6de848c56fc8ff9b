#!/usr/bin/env bash
# GPU call (~6 min, carry .gpu): the attention kernels' launch order (not yet run). Every head's
# grid runs its heaviest CTAs first, but the heads run one after another, so the last heads'
# heavy CTAs start when most SMs are done: a launch-order simulation gives the dK/dV kernel 81%
# of an ideal schedule at 1x8192 and 63% at 2x2048 (99% / 97% with the tile axis launched
# slowest, MgpuAttentionConfig(tiles_first=True)). Here both orders, per kernel, beside cuDNN.
# Output: $OUT/launch_order.log.
set -u
source scripts/gpu_env.sh
timeout 500 python3 scripts/check_mgpu_attention.py --shapes 2x2048,1x8192,1x32768 \
  --variants default,"tiles first" 2>&1 | q | tee $OUT/launch_order.log
