#!/usr/bin/env bash
# GPU call (~5 min, carry .gpu; 2026-12-01, thirteenth session): Phi-3.5-mini's and
# Phi-4-mini's layers (fused qkv_proj / gate_up_proj; LongRoPE past a pre-training length cut
# to 2048; Phi-4-mini's partial rotary), two layers each, 1x4096, each family in its own
# process (scripts/check_families_gpu.py). Output: $OUT/phi3.log.
set -u
source scripts/gpu_env.sh
timeout 420 python3 scripts/check_families_gpu.py --families phi3,phi4mini --seq-len 4096 2>&1 \
  | q | grep -v "Writing model" | tee $OUT/phi3.log
