#!/usr/bin/env bash
# GPU call (~2 min, carry .gpu): gpu_run82 found the Mosaic attention forward twice in the
# optimized HLO of a 2-layer QLoRA step (cuDNN's once; not XLA's rematerialization pass; the
# StableHLO JAX emits holds it once). Which computations hold the copies, and with remat="none"?
# Output: $OUT/recompute.log.
set -u
source scripts/gpu_env.sh
for remat in mlp none; do
  timeout 140 python3 scripts/probe_attention_recompute.py --attention mosaic --remat $remat \
    2>&1 | q | tee -a $OUT/recompute.log
done
