#!/usr/bin/env bash
# GPU call (~6 min, carry .gpu): registers of the Mosaic kernels. gpu_run71 found ptxas spilling
# in the attention dK/dV kernel at 232 registers per compute thread (132 B stores, 332 B loads;
# 40/72 at 240) and none in the forward or dQ kernels. Here, causal GQA at 2x2048 / 1x8192 /
# 1x32768: 232/40 (default), 240/24 in the backward kernels only, 240/24 everywhere, beside
# cuDNN, with per-kernel times and ptxas's resource report; then the NF4 matmul (issue 4) at
# 232/40 and 240/24 on the gate/up shape. Output: $OUT/*.log, $OUT/summary.txt.
# Run at commit ca3c902: its variant names ("bwd r240" became the default, and the
# check script's variant for the old budget is now "bwd r232").
set -u
source scripts/gpu_env.sh
export MOSAIC_GPU_DUMP_PTXAS=1
logged attention timeout 330 python3 scripts/check_mgpu_attention.py \
  --shapes 2x2048,1x8192,1x32768 --variants default,"bwd r240",r240
logged nf4 timeout 200 python3 scripts/check_nf4_matmul_mgpu.py --ms 8192 --shapes 4096x14336 \
  --configs m256s2,m256s2r240 --budget-s 180
