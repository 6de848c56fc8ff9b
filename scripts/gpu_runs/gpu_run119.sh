#!/usr/bin/env bash
# GPU call (~9 min, carry .gpu; 2026-12-01, fifteenth session): Qwen 3 MoE, second call. Whole
# QLoRA training steps (scripts/bench_train.py, random NF4 weights, r=16 on every projection
# and expert): Qwen3-30B-A3B (48 layers, 128 experts) and Mixtral-8x7B (32 layers, 8 experts).
set -u
source scripts/gpu_env.sh
timeout 330 python3 scripts/bench_train.py --model qwen3-30b-a3b \
  --cases 2x2048@mlp@auto 1x8192@mlp@auto --json $OUT/train_qwen3.json 2>&1 | q | tee $OUT/train_qwen3.log
timeout 240 python3 scripts/bench_train.py --model mixtral-8x7b \
  --cases 2x2048@mlp@auto --json $OUT/train_mixtral.json 2>&1 | q | tee $OUT/train_mixtral.log
