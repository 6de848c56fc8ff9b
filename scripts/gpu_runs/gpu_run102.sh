#!/usr/bin/env bash
# GPU call (~6 min, carry .gpu; 2026-11-30, tenth session): the fused backward after gpu_run101
# (dS stored under dK's product, commit 458e12c) against the default two-kernel backward and
# cuDNN at 2x2048 and 1x8192, and a second 1x32768 comparison against the default: whether
# "fused" should be chosen by sequence length.
# Output: $OUT/sel_{2k,8k,32k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
logged sel_2k timeout 90 python3 scripts/check_mgpu_attention.py --shapes 2x2048 \
  --variants "fused,default"
logged sel_8k timeout 110 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "fused,default"
logged sel_32k timeout 150 python3 scripts/check_mgpu_attention.py --shapes 1x32768 --no-cudnn \
  --variants "fused,default"
cat $OUT/summary.txt
