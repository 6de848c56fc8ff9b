#!/usr/bin/env bash
# Issue 4 (~7 min): the Mosaic GPU NF4 matmul as shipped (quad layout, persistent CTAs: the
# kernel's default config) at M = 4096, 8192, 16384 on the four Llama-8B shapes, both
# orientations, with the baselines; then the end-to-end A/B of ForwardOptions(matmul_variant=
# "mosaic") against the default (XLA decode + cuBLAS, grouped) at 1x8192 and 2x2048.
# Carry .gpu. 7 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv | tee $OUT/gpu.txt
timeout 250 python3 scripts/check_nf4_matmul_mgpu.py --ms 4096,8192,16384 --configs m256s2 \
  --timeout 200 --stall-s 90 --budget-s 240 2>&1 | grep -v "^W0000\|^I0000" \
  > $OUT/check_nf4_mgpu.log
grep -c "ok " $OUT/check_nf4_mgpu.log; grep "WRONG\|FAILED\|killed" $OUT/check_nf4_mgpu.log
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -2; }
bench() {  # TIMEOUT JSON ARGS...
  t=$1; j=$2; shift 2
  timeout $t python3 scripts/bench_train.py --steps 8 --warmup 3 --json $OUT/$j "$@" 2>&1 | quiet
}
bench 60 xla_8k.json --embeddings-on-host --cases "1x8192@selective:12,mlp@auto"
bench 70 mosaic_8k.json --embeddings-on-host --forward matmul_variant=mosaic \
  --cases "1x8192@selective:12,mlp@auto"
bench 45 xla_2k.json --cases "2x2048@mlp@auto"
bench 55 mosaic_2k.json --forward matmul_variant=mosaic --cases "2x2048@mlp@auto"
