#!/usr/bin/env bash
# Issue 4 (~6 min): the quad-layout NF4 kernel (each step's wgmmas awaited before the next
# decode, the faster schedule of call 1), one CTA per tile and persistent (one CTA per SM), at
# M = 4096, 8192, 16384 on the four Llama-8B shapes, both orientations, with the baselines.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv | tee $OUT/gpu.txt
timeout 560 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096,8192,16384 \
  --configs quad-m256s2,quad-m256s2-p \
  --timeout 240 --stall-s 90 --budget-s 550 2>&1 | grep -v "^W0000\|^I0000" \
  | tee $OUT/check_nf4_quad.log | tail -30
