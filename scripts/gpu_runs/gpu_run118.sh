#!/usr/bin/env bash
# GPU call (~9 min, carry .gpu; 2026-12-01, fifteenth session): Qwen 3 MoE, first call.
# (1) scripts/bench_moe.py at Qwen3-30B-A3B's expert shapes (128 experts of 768, top-8): the
# Mosaic GPU grouped matmul (2 tile configs) against the dense bf16 dot, and one MoE layer
# fwd+bwd with NF4 experts, LoRA products "dense" vs "chunked" vs no LoRA, at 4096 and 8192
# tokens; (2) the same layer comparison at Mixtral-8x7B's shapes (8192 tokens), to place
# DENSE_LORA_MAX_EXPERTS; (3) Qwen3-30B-A3B's layer (two layers, full width) against
# transformers (check_families_gpu.py, 1x2048).
set -u
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv | tee $OUT/gpu.txt
timeout 230 python3 scripts/bench_moe.py --model qwen3 --tokens 4096,8192 --impls mosaic --layer \
  --json $OUT/bench_moe_qwen3.json 2>&1 | q | tee $OUT/bench_moe_qwen3.log
timeout 150 python3 scripts/bench_moe.py --model mixtral --tokens 8192 --impls mosaic --layer \
  --json $OUT/bench_moe_mixtral.json 2>&1 | q | tee $OUT/bench_moe_mixtral.log
timeout 180 python3 scripts/check_families_gpu.py --families qwen3-moe --seq-len 2048 \
  2>&1 | q | grep -v "Writing model" | tee $OUT/qwen3_moe_layer.log
