#!/usr/bin/env bash
# GPU call (~4 min, carry .gpu): gpu_run81's profile ran the Mosaic attention forward twice per
# layer in the QLoRA step (cuDNN's once), although the step's jaxpr holds it once per layer
# segment. Count the forward custom calls in the optimized HLO of a 2-layer step: Mosaic and
# cuDNN, with and without XLA's rematerialization pass. Output: $OUT/recompute.log.
set -u
source scripts/gpu_env.sh
timeout 280 python3 scripts/probe_attention_recompute.py --attention mosaic \
  --flags="|--xla_disable_hlo_passes=rematerialization" 2>&1 | q | tee $OUT/recompute.log
timeout 150 python3 scripts/probe_attention_recompute.py --attention cudnn 2>&1 | q | tee -a $OUT/recompute.log
