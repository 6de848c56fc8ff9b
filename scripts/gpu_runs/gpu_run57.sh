#!/usr/bin/env bash
# GPU call (~3 min): where the fused dK/dV/dQ kernel's time goes (gpu_run56 measured it at 76%
# of the two-kernel backward's speed at 8K). The fused kernel with parts of its dQ work left
# out (check_mgpu_attention.py --probes; wrong dQ, timing only): a plain TMA store instead of
# the reduce-add, no store, no wait for the other warpgroup's dS rows, and both.
# Ran at commit 4b35956 (the probes lived in _dkdv_call there); removed afterwards with the fused design.
# Output: $OUT/check_mgpu_attention.log.
set -u
export PYTHONPATH=$PWD/scripts:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
LOG=$OUT/check_mgpu_attention.log
: > $LOG
quiet() { grep -v "^W0000\|^I0000\|UserWarning\|warnings.warn" | tee -a $LOG; }
for shape in 1x8192 1x32768; do
  timeout 240 python3 scripts/check_mgpu_attention.py --shapes $shape --no-cudnn --variants fused \
    --probes "store;no_copy;no_sync;no_sync+no_copy" 2>&1 | quiet
done
