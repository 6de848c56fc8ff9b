#!/usr/bin/env bash
# GPU call (~9 min, carry .gpu; 2026-12-01, fourteenth session): Mixtral, second call. Run 114
# measured XLA's ragged_dot at 90-97 TFLOP/s (a padded dense rewrite) and lost the other rows
# to a global flag. (1) scripts/bench_moe.py, each implementation in its own process: xla,
# cudnn (XLA flag), jax's Mosaic GPU grouped matmul (4 tile configs), and one MoE layer
# fwd+bwd per implementation (lorax's default is now mosaic). (2) Mixtral's layer, and the same
# with all 8 experts per token, in check_families_gpu.py at 1x2048.
set -u
source scripts/gpu_env.sh
timeout 280 python3 scripts/bench_moe.py --tokens 4096,8192 --impls xla,cudnn,mosaic --layer \
  --json $OUT/bench_moe.json 2>&1 | q | tee $OUT/bench_moe.log
timeout 290 python3 scripts/check_families_gpu.py --families mixtral,mixtral-all8 --seq-len 2048 \
  2>&1 | q | grep -v "Writing model" | tee $OUT/mixtral.log
