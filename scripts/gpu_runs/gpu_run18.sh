#!/usr/bin/env bash
# GPU call (~6 min): first light of the Mosaic GPU NF4 matmul (issue 4): correctness and speed
# at M = 4096 for the Llama-8B projection shapes, three configs (each in its own subprocess
# under a timeout), against the bf16 dot and XLA's dequantize-then-dot.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
timeout 380 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096 --configs m128s4,m256s2,m128s4-yT \
  --budget-s 360 2>&1 | grep -v "^W0000\|^I0000" | tee $OUT/check_nf4_mgpu.log | tail -60
