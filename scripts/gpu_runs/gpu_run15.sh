#!/usr/bin/env bash
# Next GPU session, call 1 (~5 min): the Mosaic attention kernels at all three shapes, including
# the third fused-dQ design (never run on a GPU yet) and the per-kernel split of the default
# backward (dK/dV vs dQ kernel), against cuDNN. Output: $OUT/check_mgpu_attention.log.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
timeout 560 python3 scripts/check_mgpu_attention.py --shapes 1x8192,2x2048,1x32768 \
  --variants "dq kv128,fused-dq,dq kv64" 2>&1 \
  | grep -v "^W0000\|^I0000\|UserWarning\|warnings.warn" | tee $OUT/check_mgpu_attention.log | tail -40
