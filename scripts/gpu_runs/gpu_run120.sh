#!/usr/bin/env bash
# GPU call (~5 min, carry .gpu; 2026-12-01, fifteenth session): Qwen 3 MoE, third call. Run
# 119's Mosaic grouped matmuls ran at 36-46% of the dense dot at Qwen3-30B-A3B's shapes, with
# Mixtral's tiles (its f32 reference, XLA's padded ragged dot, ran out of memory in the other
# two). (1) a tile sweep there (bench_moe.py --sweep qwen3, per-group reference); (2) the whole
# Qwen3-30B-A3B step under remat "full" (the memory floor of the step), 2x2048.
set -u
source scripts/gpu_env.sh
timeout 240 python3 scripts/bench_moe.py --model qwen3 --tokens 8192 --impls mosaic --sweep qwen3 \
  --child-timeout 220 --json $OUT/bench_moe_qwen3_sweep.json 2>&1 | q | tee $OUT/bench_moe_qwen3_sweep.log
timeout 150 python3 scripts/bench_train.py --model qwen3-30b-a3b --cases 2x2048@full@auto \
  --json $OUT/train_qwen3_full.json 2>&1 | q | tee $OUT/train_qwen3_full.log
