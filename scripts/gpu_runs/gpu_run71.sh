#!/usr/bin/env bash
# GPU call (~4 min, run with carry .gpu .ab_fused): do the Mosaic attention kernels spill?
# ptxas's resource report (MOSAIC_GPU_DUMP_PTXAS: registers, stack, spill stores/loads) for the
# current forward, dK/dV and dQ kernels (default and 240 registers), and for the fused
# dK/dV+dQ backward of commit 4b35956 (FlashAttention-3's split; measured at 76% of the
# two-kernel backward in gpu_run56/57), extracted as .ab_fused by `git archive 4b35956`.
# Output: $OUT/*.log (full stdout) and $OUT/ptxas_summary.txt.
set -u
source scripts/gpu_env.sh
export MOSAIC_GPU_DUMP_PTXAS=1
summary=$OUT/ptxas_summary.txt
: > $summary
run() {  # name, then the command
  local name=$1; shift
  "$@" > $OUT/$name.log 2>&1
  echo "== $name (rc=$?)" >> $summary
  grep -E "Compiling entry|Function properties|registers|spill|stack frame|TFLOP|ms|max-abs|rel" \
    $OUT/$name.log | grep -v "^W0000\|^I0000" >> $summary
}
run current timeout 200 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants default,r240 --no-cudnn
cd .ab_fused
export PYTHONPATH=$PWD/scripts:$PWD
run fused timeout 200 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants fused,"fused r240" --no-cudnn --probes "no_sync+no_copy"
