#!/usr/bin/env bash
# Issue 4 (~5 min): the quad-layout NF4 kernel (pallas_kernels/nf4_quad_mgpu.py), both
# orientations from registers, at M = 4096 on the four Llama-8B shapes; the current Mosaic
# kernel (m256s2-prmt) in the same call for the same-machine comparison.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv | tee $OUT/gpu.txt
timeout 480 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096 \
  --configs quad-m256s2,quad-m256s2-sync,m256s2-prmt,quad-m128s4 \
  --timeout 150 --stall-s 90 --budget-s 470 2>&1 | grep -v "^W0000\|^I0000" \
  | tee $OUT/check_nf4_quad.log | tail -80
