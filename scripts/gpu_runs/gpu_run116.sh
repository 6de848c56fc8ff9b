#!/usr/bin/env bash
# GPU call (~8 min, carry .gpu; 2026-12-01, fourteenth session): Mixtral, third call. Run 115's
# bench was cut by its timeout in the cudnn child, before the mosaic rows. (1) Mixtral's layer
# with all 8 experts per token (check_families_gpu.py, 1x2048); (2) scripts/bench_moe.py at 8192
# tokens: jax's Mosaic GPU grouped matmul (4 tile configs) and one MoE layer fwd+bwd with it,
# then XLA's lowering under the cuDNN flag.
set -u
source scripts/gpu_env.sh
timeout 200 python3 scripts/check_families_gpu.py --families mixtral-all8 --seq-len 2048 \
  2>&1 | q | grep -v "Writing model" | tee $OUT/mixtral_all8.log
timeout 270 python3 scripts/bench_moe.py --tokens 8192 --impls mosaic,cudnn --layer \
  --json $OUT/bench_moe.json 2>&1 | q | tee $OUT/bench_moe.log
