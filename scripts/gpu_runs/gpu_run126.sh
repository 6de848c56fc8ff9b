#!/usr/bin/env bash
# GPU call (~3 min, carry .gpu; 2026-12-01, sixteenth session): where Qwen3-30B-A3B's QLoRA
# step (2x2048, mlp) spends its time, by op category (profile_train.py --model).
set -u
source scripts/gpu_env.sh
timeout 200 python3 scripts/profile_train.py --model qwen3-30b-a3b --case 2x2048:mlp --top 30 \
  --json $OUT/profile_qwen3.json 2>&1 | q | tee $OUT/profile_qwen3.log
