#!/usr/bin/env bash
# GPU call (~6 min, run with carry .gpu): Llama-3.1-8B QLoRA at 1x8192 with every layer's
# attention in a 4096 sliding window (Mistral's) and packed rows (mean example 1024, so some
# examples are longer than the window): the default attention (now the Mosaic kernels) against
# the Triton kernels (the default before). Output: $OUT/*.log, *.json
set -u
source scripts/gpu_env.sh
timeout 560 python3 scripts/bench_train.py \
  --cases "1x8192@selective:12,mlp@auto" "1x8192@selective:12,mlp@pallas" \
  --embeddings-on-host --packed 2048 --sliding-window 4096 --steps 6 --warmup 2 \
  --json $OUT/bench_train_window.json 2>&1 | q | tee $OUT/bench_train_window.log
