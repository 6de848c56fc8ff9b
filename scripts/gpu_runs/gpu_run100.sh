#!/usr/bin/env bash
# Ran at 1f68c4a (2026-11-30, tenth session); fused_q_slots=3 was 4% slower than "fused" at
# 1x32768 and fused_q_slots=2 0.9% slower; both were removed (BENCHMARKS.md §3). The 8K and 2K
# steps stopped at their timeouts after the first variant. Raw output:
# scripts/results/h200-2026-11-30-s10/run100/.
# GPU call (~7 min, carry .gpu; 2026-11-30, tenth session): the fused backward with Q (and lse₂)
# in a ring of its own, released apart from dO (fused_q_slots: "fused q2" releases dO after
# warpgroup 1's dpT instead of after its dK; "fused q3" adds a third Q slot). Nsight Compute
# (run97) had warpgroup 0 waiting 29% of its samples for the next Q tile, whose slot freed only
# when warpgroup 1 was done with the tile before plus a TMA's latency. Against cuDNN, the
# default and "fused" in the same call. Offline at 1x32768 (scripts/ptxas_report.py): hot loops
# ~450 / ~650 instructions, 1-2 / 6 local loads (q3; "fused": ~450 / ~630, 0 / 5).
# Output: $OUT/q_{32k,8k,2k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
logged q_32k timeout 260 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --variants "fused q3,fused q2,fused,default"
logged q_8k timeout 100 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "fused q3,fused,default"
logged q_2k timeout 80 python3 scripts/check_mgpu_attention.py --shapes 2x2048 --no-cudnn \
  --variants "fused q3,fused"
cat $OUT/summary.txt
