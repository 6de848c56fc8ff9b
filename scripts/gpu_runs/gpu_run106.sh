#!/usr/bin/env bash
# GPU call (~6 min; 2026-12-01, eleventh session): packed rows of ~1K-token examples at 1x8192
# with each backward forced, in a process of its own each (gpu_run105's run of both in one
# process reached its timeout in the second): whether bwd_dq="auto" should look at segment ids,
# whose reach (the examples' length) the trace cannot see.
# Output: $OUT/packed_8k_{kernel,fused}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
for variant in fused kernel; do
  logged packed_8k_$variant timeout 170 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
    --segments 1024 --no-cudnn --variants $variant
done
cat $OUT/summary.txt
