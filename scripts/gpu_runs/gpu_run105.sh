#!/usr/bin/env bash
# GPU call (~8 min; 2026-12-01, eleventh session): bwd_dq="auto" (the fused backward from a reach
# of 8192 keys, the two kernels below) as the default. bench_attention.py's table (the issue's
# script) with the default config, Mosaic against cuDNN, at the three shapes; packed rows of
# ~1K-token examples at 1x8192 with each backward forced (whether "auto" should look at
# segments); the 1x8192 Llama-3.1-8B QLoRA step with cuDNN and with the Mosaic kernels
# (cuDNN stays the model's default for unpacked rows unless Mosaic's step is faster).
# Output: $OUT/main.{log,json}, $OUT/packed_8k.log, $OUT/train.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
BENCH_TIMEOUT=160 BENCH_BUDGET=140 bench main --shapes 2x2048,1x8192,1x32768 --impls mosaic,cudnn
logged packed_8k timeout 150 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --segments 1024 --no-cudnn --variants "kernel,fused"
: > $OUT/train.log
for attention in auto mosaic; do
  timeout 90 python3 scripts/bench_train.py --steps 6 --warmup 2 --embeddings-on-host \
    --cases "1x8192@selective:12,mlp@$attention" 2>&1 \
    | grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/train.log | tail -1
done
cat $OUT/summary.txt
