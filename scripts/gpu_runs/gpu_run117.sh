#!/usr/bin/env bash
# GPU call (~3 min, carry .gpu; 2026-12-01, fourteenth session): the Mosaic GPU grouped matmul
# with run 116's winning tiles as MosaicRaggedConfig's defaults (5 steps, grid_block_n=4),
# against the old ones, at 4096 and 8192 tokens, and one MoE layer fwd+bwd with them.
set -u
source scripts/gpu_env.sh
timeout 200 python3 scripts/bench_moe.py --tokens 4096,8192 --impls mosaic --layer \
  --json $OUT/bench_moe.json 2>&1 | q | tee $OUT/bench_moe.log
