#!/usr/bin/env bash
# Runs at commit d230ed0: fwd_overlap was removed after these timings (BENCHMARKS §3).
# GPU call (~8 min, carry .gpu .ab_old): gpu_run86 timed fwd_overlap only at 2x2048 (its
# 1x8192 runs hit their timeouts while computing the f32 reference): 363 against 468 TFLOP/s.
# Here the forward alone (--forward-only: no reference, outputs against the default's), default
# and fwd_overlap at 232/40 and at 240/24, at 2x2048, 1x8192 and 1x32768, then the 1x8192
# window, softcap and packed cases. Then gpu_run85 (softcapped dK/dV against e0cc06c).
# Output: $OUT/fwd_*.log, gpu_run85's logs, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
variants="default,fwd overlap,r240,fwd overlap r240"
fwd() {  # NAME ARGS...
  local name=$1; shift
  logged fwd_$name timeout 150 python3 scripts/check_mgpu_attention.py --forward-only \
    --variants "$variants" "$@"
}
fwd shapes --shapes 2x2048,1x8192,1x32768
fwd window --shapes 1x8192 --window 4096
fwd softcap --shapes 1x8192 --softcap 50 --no-cudnn
fwd packed --shapes 1x8192 --segments 1024 --no-cudnn
bash scripts/gpu_runs/gpu_run85.sh
