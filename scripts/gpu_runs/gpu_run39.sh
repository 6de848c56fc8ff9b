#!/usr/bin/env bash
# Issue 4 (~5 min): the NF4 kernel's 192-token tile with a 3-deep ring (m192s3; the 256-token
# tile only fits 2 slots) against the default m256s2, same call, M = 4096-16384, both
# orientations, with the baselines. Carry .gpu. 2 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv | tee $OUT/gpu.txt
timeout 420 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096,8192,16384 --configs m256s2,m192s3 \
  --timeout 200 --stall-s 90 --budget-s 410 2>&1 | grep -v "^W0000\|^I0000" \
  > $OUT/check_nf4_mgpu.log
grep -c "ok " $OUT/check_nf4_mgpu.log; grep "WRONG\|FAILED\|killed" $OUT/check_nf4_mgpu.log
grep "mgpu m" $OUT/check_nf4_mgpu.log | tail -48
