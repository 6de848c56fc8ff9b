#!/usr/bin/env bash
# GPU call (~5 min, carry .gpu; 2026-12-01, sixteenth session): whole QLoRA steps (2x2048, mlp)
# of Qwen1.5-MoE-A2.7B (Qwen 2 MoE: 24 layers, 60 experts top-4 and a shared expert) for the
# first time, and of Qwen3-30B-A3B after commit 3ea5685 (the MoE gradient without atomic adds).
set -u
source scripts/gpu_env.sh
timeout 130 python3 scripts/bench_train.py --model qwen15-moe-a27b --cases 2x2048@mlp@auto \
  --json $OUT/train_qwen15.json 2>&1 | q | tee $OUT/train_qwen15.log
timeout 150 python3 scripts/bench_train.py --model qwen3-30b-a3b --cases 2x2048@mlp@auto \
  --json $OUT/train_qwen3.json 2>&1 | q | tee $OUT/train_qwen3.log
