#!/usr/bin/env bash
# GPU call (~8 min, carry .gpu; 2026-12-01, fourteenth session): Mixtral. (1) grouped matmuls
# at Mixtral-8x7B's expert shapes, top-2 of 8, 4096 and 8192 tokens: XLA's ragged_dot lowering
# by default, through Pallas Triton, through cuDNN (XLA flag), and jax's Mosaic GPU kernel,
# against the bf16 dot of the same FLOPs; one MoE layer fwd+bwd as lorax runs it
# (scripts/bench_moe.py). (2) Mixtral's layer in scripts/check_families_gpu.py at 1x4096.
set -u
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv | tee $OUT/gpu.txt
timeout 300 python3 scripts/bench_moe.py --tokens 4096,8192 --layer --json $OUT/bench_moe.json \
  2>&1 | q | tee $OUT/bench_moe.log
timeout 240 python3 scripts/check_families_gpu.py --families mixtral --seq-len 4096 2>&1 \
  | q | grep -v "Writing model" | tee $OUT/mixtral.log
