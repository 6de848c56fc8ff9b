#!/usr/bin/env bash
# Issue 4 (~5 min). (A) lorax train --kernel-weights on the GPU: auto at 1x1024 must prepare,
# none must not, auto at 4x1024 must not; prepared and loaded losses must agree
# (scripts/check_kernel_weights_cli.py). (B) decode-sized M on the few-tile shapes: is the
# Mosaic kernel's 2-slot ring what holds 14336x4096 at 0.76-0.90x XLA? Deeper rings at M = 64
# and 256 (single calls: these run 140-180 µs, above the ~40 µs dispatch floor). 3 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
timeout 330 python3 scripts/check_kernel_weights_cli.py --steps 30 2>&1 \
  | grep -v "^W0000\|^I0000" > $OUT/cli.log
tail -12 $OUT/cli.log
timeout 200 python3 scripts/check_nf4_matmul_mgpu.py --ms 64,256 --shapes 14336x4096,4096x4096 \
  --configs m256s2,m64s4,m64s8 --direction fwd --budget-s 180 2>&1 \
  | grep -v "^W0000\|^I0000" > $OUT/rings.log
tail -24 $OUT/rings.log
