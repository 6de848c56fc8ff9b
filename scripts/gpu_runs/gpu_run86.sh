#!/usr/bin/env bash
# Runs at commit dbf13cb: fwd_overlap was removed after these timings (BENCHMARKS §3).
# GPU call (~7 min, carry .gpu; run 2026-11-30, seventh session): the forward with fwd_overlap (each tile's
# softmax under the next tile's scores product, FlashAttention-3's intra-warpgroup overlap;
# offline SASS: 66 exp2 between the scores product's issue and its wait in the hot loop, no
# local memory at 240/24) against the default, per kernel, at 2x2048, 1x8192 and 1x32768, then
# the 1x8192 window and softcap cases and packed rows, with ptxas's reports.
# Output: $OUT/{shapes,window,softcap,packed}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
export MOSAIC_GPU_DUMP_PTXAS=1
variants="default,fwd overlap,fwd overlap r240"
logged shapes timeout 200 python3 scripts/check_mgpu_attention.py \
  --shapes 2x2048,1x8192,1x32768 --variants "$variants"
logged window timeout 80 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "$variants" --window 4096
logged softcap timeout 80 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "$variants" --softcap 50 --no-cudnn
logged packed timeout 80 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "$variants" --segments 1024 --no-cudnn
