#!/usr/bin/env bash
# Issue 4 (~8 min): the published kernel table again with a fair ceiling. Until this commit
# check_nf4_matmul_mgpu.py's (a) and (b) dots produced a float32 result and cast it, an extra
# pass over the output that XLA does not fuse into the GEMM: call 4 of 2026-11-29 s10 showed
# cuBLAS at ~710 TFLOP/s inside the training step on gate/up where (a) had read 618.
# --f32-out-dot prints the old (a) too, to size the correction. Then the LoRA groups at
# M = 8192. Carry .gpu. 3 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv | tee $OUT/gpu.txt
timeout 330 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096,8192,16384 --configs m256s2 \
  --f32-out-dot --timeout 260 --stall-s 90 --budget-s 320 2>&1 | grep -v "^W0000\|^I0000" \
  > $OUT/check_nf4_mgpu.log
grep -c "ok " $OUT/check_nf4_mgpu.log; grep "WRONG\|FAILED\|killed" $OUT/check_nf4_mgpu.log
timeout 170 python3 scripts/check_nf4_lora_group_mgpu.py --ms 8192 2>&1 \
  | grep -v "^W0000\|^I0000" > $OUT/check_lora_group.log
tail -4 $OUT/check_lora_group.log
