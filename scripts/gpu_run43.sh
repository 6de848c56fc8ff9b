#!/usr/bin/env bash
# Issue 4 (~8 min, not yet run): the tile order of the NF4 kernel (group_m: token tiles
# fastest within groups, so W tiles are shared in L2) on the stacked group shapes (q/k/v
# 4096x6144, gate/up 4096x28672: 58 MB of NF4, more than L2) and the worst shape at M = 16384
# (14336x4096), then the LoRA groups (fixed script: weights as arguments, random dot W).
# Carry .gpu. 3 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv | tee $OUT/gpu.txt
timeout 300 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096,16384 \
  --shapes 4096x6144,4096x28672,14336x4096 --configs m256s2,m256s2g4,m256s2g8 \
  --timeout 200 --stall-s 90 --budget-s 290 2>&1 | grep -v "^W0000\|^I0000" \
  > $OUT/check_nf4_order.log
grep "WRONG\|FAILED\|killed" $OUT/check_nf4_order.log
timeout 200 python3 scripts/check_nf4_lora_group_mgpu.py --ms 4096,8192 2>&1 \
  | grep -v "^W0000\|^I0000" > $OUT/check_lora_group.log
tail -4 $OUT/check_lora_group.log
