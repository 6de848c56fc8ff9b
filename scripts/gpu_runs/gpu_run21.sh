#!/usr/bin/env bash
# Next session (~6 min): the Mosaic GPU NF4 matmul in both directions (issue 4): the forward
# (measured 88-93% of the bf16 dot) and the first GPU run of the dx = dy·W backward kernel,
# M = 4096, the four Llama-8B shapes, against the bf16 dot and XLA's decode-then-dot.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
timeout 560 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096 --configs m256s2-prmt,m128s4-prmt \
  --direction fwd,bwd --timeout 200 --budget-s 540 2>&1 | grep -v "^W0000\|^I0000" \
  | tee $OUT/check_nf4_mgpu.log | tail -60
