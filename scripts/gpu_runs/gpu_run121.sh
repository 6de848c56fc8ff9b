#!/usr/bin/env bash
# GPU call (~8 min, carry .gpu; 2026-12-01, fifteenth session): Qwen 3 MoE, fourth call, with
# run 120's winning tiles for many experts (MANY_EXPERTS_TILES: block_m 64, block_n 256, 4
# steps) as lorax's pick above 16 experts. (1) the whole Qwen3-30B-A3B step again (2x2048,
# mlp); (2) a whole Mixtral-8x7B QLoRA step (2x2048, mlp; 32 layers, 8 experts); (3) the
# grouped matmuls with lorax's tiles at Qwen3-30B-A3B's shapes (all four orientations) and its
# MoE layer fwd+bwd with LoRA "dense" / "chunked" / none, 8192 tokens.
set -u
source scripts/gpu_env.sh
timeout 120 python3 scripts/bench_train.py --model qwen3-30b-a3b --cases 2x2048@mlp@auto \
  --json $OUT/train_qwen3.json 2>&1 | q | tee $OUT/train_qwen3.log
timeout 150 python3 scripts/bench_train.py --model mixtral-8x7b --cases 2x2048@mlp@auto \
  --json $OUT/train_mixtral.json 2>&1 | q | tee $OUT/train_mixtral.log
timeout 200 python3 scripts/bench_moe.py --model qwen3 --tokens 8192 --impls mosaic --layer \
  --no-sweep --child-timeout 180 --json $OUT/bench_moe_qwen3.json 2>&1 | q | tee $OUT/bench_moe_qwen3.log
