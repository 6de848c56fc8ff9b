#!/usr/bin/env bash
# Runs at commit a3830de: fwd_paired_products was removed after these timings (BENCHMARKS §3).
# GPU call (~3 min, carry .gpu; run 2026-11-30, seventh session): the forward with fwd_paired_products (each tile's PV issued
# with the next tile's scores: one tensor-core turn and one wgmma wait per tile instead of two;
# offline SASS: hot loop 472 instructions against 466, 16 wgmmas, one DEPBAR, no spills) against
# the default. First the forward alone at 2x2048, 1x8192 and 1x32768 (also at 240/24), then
# forward+backward at 1x32768 beside cuDNN (issue 5's unmet shape), then the forward alone with
# a window, softcap and packed rows.
# Output: $OUT/{fwd_shapes,full_32k,fwd_window,fwd_softcap,fwd_packed}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
fwd() {  # NAME ARGS...
  local name=$1; shift
  logged fwd_$name timeout 120 python3 scripts/check_mgpu_attention.py --forward-only "$@"
}
fwd shapes --shapes 2x2048,1x8192,1x32768 --variants "default,paired,r240,paired r240"
logged full_32k timeout 150 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --variants "default,paired"
fwd window --shapes 1x8192 --window 4096 --variants "default,paired"
fwd softcap --shapes 1x8192 --softcap 50 --no-cudnn --variants "default,paired"
fwd packed --shapes 1x8192 --segments 1024 --no-cudnn --variants "default,paired"
