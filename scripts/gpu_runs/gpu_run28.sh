#!/usr/bin/env bash
# Issue 4 (~3 min): the NF4 backward kernel with one wgmma kept in flight across each decode
# (MgpuNF4Config.overlap_backward), then the current backward for the same-call baseline.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
timeout 250 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096 --configs m256s2-prmt-ov,m256s2-prmt \
  --direction bwd --timeout 100 --budget-s 240 2>&1 | grep -v "^W0000\|^I0000" \
  | tee $OUT/check_nf4_mgpu.log | tail -40
