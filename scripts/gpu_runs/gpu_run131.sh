#!/usr/bin/env bash
# GPU call (~6 min, carry .gpu; 2026-12-01, eighteenth session): DeepSeek V2's RoPE now turns
# in float32 (as transformers' V2). DeepSeek-V2-Lite's two full-width layers vs transformers
# (as run 128) and its whole QLoRA step at 2x2048 / 1x8192, remat mlp (as run 129).
set -u
source scripts/gpu_env.sh
timeout 260 python3 scripts/check_families_gpu.py --families deepseek-v2-lite --seq-len 4096 \
  --child-timeout 240 2>&1 | q | tee $OUT/check_deepseek_v2_lite.log
timeout 250 python3 scripts/bench_train.py --model deepseek-v2-lite \
  --cases 2x2048@mlp@auto 1x8192@mlp@auto --json $OUT/train_deepseek_v2_lite.json 2>&1 | q \
  | tee $OUT/train_deepseek_v2_lite.log
