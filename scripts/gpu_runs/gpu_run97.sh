#!/usr/bin/env bash
# GPU call (~3 min, carry .gpu; 2026-11-30, ninth session): Nsight Compute's per-instruction
# warp-stall samples of the fused backward (bwd_dq="fused") at 1x8192, one launch: which SASS
# instructions its warpgroups wait at (P hand-off, wgmma waits, barriers, spill reloads).
# Output: $OUT/fused_source.csv (ncu --page source --print-source sass), $OUT/fused_stalls.txt.
set -u
source scripts/gpu_env.sh
timeout 200 ncu --clock-control none --section WarpStateStats --section SourceCounters \
  -k regex:fused_bwd -c 1 -f -o $OUT/src python3 scripts/profile_attention_kernels.py \
  --shape 1x8192 --impls fused 2>&1 | q | grep -v "^==PROF==" | tail -3
ncu -i $OUT/src.ncu-rep --page source --csv --print-source sass > $OUT/fused_source.csv 2>&1
ncu -i $OUT/src.ncu-rep --page details > $OUT/fused_stalls.txt 2>&1
rm -f $OUT/src.ncu-rep
ls -la $OUT; head -c 1500 $OUT/fused_source.csv
