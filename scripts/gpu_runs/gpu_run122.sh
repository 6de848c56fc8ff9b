#!/usr/bin/env bash
# GPU call (~8 min, carry .gpu; 2026-12-01, sixteenth session): Qwen 3 MoE, what the fifteenth
# session left. (1) Qwen3-30B-A3B's layer (two layers, full width) against transformers
# (check_families_gpu.py, 1x2048); (2) the grouped matmuls at its expert shapes through lorax's
# own call with its tiles, all four orientations (the down projection's child ran out of memory
# in runs 120-121: the parent then held the dense ceiling's GPU memory; it now runs in a child
# too), and its MoE layer fwd+bwd with LoRA "dense" / "chunked" / none, each step repeated to
# check that it is bitwise deterministic; 8192 tokens.
set -u
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv | tee $OUT/gpu.txt
timeout 200 python3 scripts/check_families_gpu.py --families qwen3-moe --seq-len 2048 \
  2>&1 | q | grep -v "Writing model" | tee $OUT/qwen3_moe_layer.log
timeout 280 python3 scripts/bench_moe.py --model qwen3 --tokens 8192 --impls mosaic --layer \
  --no-sweep --child-timeout 240 --json $OUT/bench_moe_qwen3.json 2>&1 | q | tee $OUT/bench_moe_qwen3.log
