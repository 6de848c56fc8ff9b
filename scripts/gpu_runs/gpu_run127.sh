#!/usr/bin/env bash
# GPU call (~3.5 min, carry .gpu; 2026-12-01, sixteenth session): the routing's permutations
# differentiated as the inverse gather (custom VJP). Qwen3-30B-A3B's MoE layer (8192 tokens,
# bitwise repeat checked) and its whole QLoRA step (2x2048, mlp) again.
set -u
source scripts/gpu_env.sh
timeout 110 python3 scripts/bench_moe.py --model qwen3 --tokens 8192 --impls mosaic --layer-only \
  --child-timeout 90 --json $OUT/bench_moe_qwen3.json 2>&1 | q | tee $OUT/bench_moe_qwen3.log
timeout 95 python3 scripts/bench_train.py --model qwen3-30b-a3b --cases 2x2048@mlp@auto \
  --json $OUT/train_qwen3.json 2>&1 | q | tee $OUT/train_qwen3.log
