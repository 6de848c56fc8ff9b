#!/usr/bin/env bash
# Issue 4 (~2 min): the top of the M range. Correctness and time of the Mosaic kernel
# at M = 65536 (the gate/up and down shapes, both orientations), against cuBLAS on a bf16 W and
# XLA's decode + dot. 1 file back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
timeout 150 python3 scripts/check_nf4_matmul_mgpu.py --ms 65536 --shapes 4096x14336,14336x4096 \
  --budget-s 140 2>&1 | grep -v "^W0000\|^I0000" > $OUT/check_64k.log
grep "M=\|mgpu \|(a)\|(b)" $OUT/check_64k.log
