#!/usr/bin/env bash
# Issue 4 (~9.5 min, not yet run): (1) the tile order of the NF4 kernel (group_m: token
# tiles fastest within groups, so W tiles are shared in L2) on the stacked group shapes
# (q/k/v 4096x6144, gate/up 4096x28672: 58 MB of NF4, more than L2) and the worst shape at
# M = 16384 (14336x4096); (2) the kernel's own cost of a LoRA low-rank term (Σr = 48, as
# q/k/v at r = 16) on the four group shapes; (3) the LoRA groups against the XLA path
# (fixed script: weights as arguments, random dot W). Carry .gpu. 4 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv | tee $OUT/gpu.txt
timeout 250 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096,16384 \
  --shapes 4096x6144,4096x28672,14336x4096 --configs m256s2,m256s2g4,m256s2g8 \
  --timeout 120 --stall-s 90 --budget-s 240 2>&1 | grep -v "^W0000\|^I0000" \
  > $OUT/check_nf4_order.log
grep "WRONG\|FAILED\|killed" $OUT/check_nf4_order.log
timeout 130 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096 --no-baselines --low-rank 48 \
  --shapes 4096x6144,4096x4096,4096x28672,14336x4096 --configs m256s2 \
  --timeout 120 --stall-s 90 --budget-s 125 2>&1 | grep -v "^W0000\|^I0000" \
  > $OUT/check_nf4_low_rank.log
grep "WRONG\|FAILED\|killed" $OUT/check_nf4_low_rank.log
timeout 170 python3 scripts/check_nf4_lora_group_mgpu.py --ms 4096 2>&1 \
  | grep -v "^W0000\|^I0000" > $OUT/check_lora_group.log
tail -4 $OUT/check_lora_group.log
