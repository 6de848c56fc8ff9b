#!/usr/bin/env bash
# Issue 4 (~2.5 min): the NF4 kernel's output against the dot with its own decoded weights
# (dequantize_prepared: only the bf16 output rounding should remain, < 2.2e-3), M = 4096, the
# four Llama-8B shapes, both orientations. Carry .gpu. 1 file back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
timeout 200 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096 --configs m256s2 --no-baselines \
  --timeout 190 --stall-s 90 --budget-s 195 2>&1 | grep -v "^W0000\|^I0000" \
  > $OUT/check_nf4_mgpu.log
grep "rel.L2\|WRONG\|FAILED\|killed" $OUT/check_nf4_mgpu.log
