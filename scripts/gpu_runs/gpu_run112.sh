#!/usr/bin/env bash
# GPU call (~3 min, carry .gpu; 2026-12-01, thirteenth session): Gemma 3 alone in its own
# process, 1x8192 (scripts/check_families_gpu.py). In gpu_run110 it ran after Gemma 2 in the same
# process and transformers' logits came out 25% off, where gpu_run111 found transformers and
# lorax on CPU and GPU within 2e-5 of each other in a fresh process: each family runs in its
# own process from here on. Output: $OUT/gemma3.log.
set -u
source scripts/gpu_env.sh
timeout 300 python3 scripts/check_families_gpu.py --families gemma3 --seq-len 8192 2>&1 | q \
  | grep -v "Writing model" | tee $OUT/gemma3.log
