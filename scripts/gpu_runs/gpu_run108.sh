#!/usr/bin/env bash
# GPU call (~4 min; 2026-12-01, eleventh session): bench_attention.py (the script) at
# 1x32768 again, Mosaic (default config: the fused backward there) against cuDNN, a second
# sample of gpu_run105's 1.6% margin; and XLA's rows at 2x2048 and 1x8192 for the table.
# Output: $OUT/main_32k.{log,json}, $OUT/xla.{log,json}.
set -u
source scripts/gpu_env.sh
BENCH_TIMEOUT=120 BENCH_BUDGET=100 bench main_32k --shapes 1x32768 --impls mosaic,cudnn
BENCH_TIMEOUT=150 BENCH_BUDGET=130 bench xla --shapes 2x2048,1x8192 --impls xla
