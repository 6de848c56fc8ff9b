#!/usr/bin/env bash
# GPU call (~10 min, carry .gpu; 2026-12-01, sixteenth session). (1) Qwen3-30B-A3B's MoE layer
# fwd+bwd at 8192 tokens after commit 3ea5685 (the gradient's scatters made permutations, the
# frozen weights an argument so that their NF4 decode is timed): does each step now repeat
# bitwise? (2) Qwen1.5-MoE-A2.7B's two full-width layers (60 experts of 1408, top-4, a shared
# expert of 5632) against transformers (check_families_gpu.py, 1x2048); (3) Mixtral-8x7B's
# layer with LoRA "dense" vs "chunked" vs none, the weights now arguments.
set -u
source scripts/gpu_env.sh
timeout 170 python3 scripts/bench_moe.py --model qwen3 --tokens 8192 --impls mosaic --layer-only \
  --child-timeout 150 --json $OUT/bench_moe_qwen3.json 2>&1 | q | tee $OUT/bench_moe_qwen3.log
timeout 265 python3 scripts/check_families_gpu.py --families qwen2-moe --seq-len 2048 \
  --child-timeout 250 2>&1 | q | grep -v "Writing model" | tee $OUT/qwen2_moe_layer.log
timeout 150 python3 scripts/bench_moe.py --model mixtral --tokens 8192 --impls mosaic --layer-only \
  --child-timeout 130 --json $OUT/bench_moe_mixtral.json 2>&1 | q | tee $OUT/bench_moe_mixtral.log
