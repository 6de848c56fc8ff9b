#!/usr/bin/env bash
# GPU call (~4 min): the Mosaic GPU NF4 matmul with the prmt table-lookup decode (issue 4) at
# M = 4096, against the bf16 dot and XLA's decode-then-dot (the select-tree decode was
# measured by gpu_run18.sh).
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
timeout 250 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096 --configs m256s2-prmt,m128s4-prmt \
  --budget-s 230 2>&1 | grep -v "^W0000\|^I0000" | tee $OUT/check_nf4_mgpu.log | tail -40
