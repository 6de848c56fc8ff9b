#!/usr/bin/env bash
# GPU call (~4 min, carry .gpu .ab_probe): what the dK/dV kernel's masked steps cost. Its
# efficiency falls with S (gpu_run72, real tensor work: 398 / 556 / 653 TFLOP/s at 2K / 8K /
# 32K) as if each CTA's 8 masked steps (2 per query head at the diagonal) cost ~6 unmasked
# ones. .ab_probe is this commit's kernels (`git archive`) with a measurement-only switch,
# LORAX_PROBE: "nomask" runs the masked steps without the causal mask (wrong dK/dV, same
# work), "skipmasked" skips them (only the ring's barriers). ptxas's spill report for each.
# Output: $OUT/probe_*.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
export MOSAIC_GPU_DUMP_PTXAS=1
cd .ab_probe
export PYTHONPATH=$PWD/scripts:$PWD
for probe in none nomask skipmasked; do
  LORAX_PROBE=$probe logged probe_$probe timeout 170 python3 scripts/check_mgpu_attention.py \
    --shapes 2x2048,1x8192,1x32768 --variants "bwd r240" --no-cudnn
done
