#!/usr/bin/env bash
# GPU call (~6 min, carry .gpu: the gguf package; 2026-12-01, eleventh session): the 1x8192
# Llama-3.1-8B QLoRA step with the model's default attention for unpacked rows (cuDNN) and with
# the Mosaic kernels, whose backward is now the fused one at this length (bwd_dq="auto"),
# twice each in alternating order: whether Mosaic should become the unpacked default on Hopper
# (the seventh session's call had cuDNN 1% ahead, 12,658 against 12,534 tok/s).
# Output: $OUT/train.log and one JSON per run.
set -u
source scripts/gpu_env.sh
: > $OUT/train.log
for run in auto_1 mosaic_1 mosaic_2 auto_2; do
  timeout 120 python3 scripts/bench_train.py --steps 6 --warmup 2 --embeddings-on-host \
    --json $OUT/8k_$run.json --cases "1x8192@selective:12,mlp@${run%_*}" 2>&1 \
    | grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/train.log | tail -1
done
