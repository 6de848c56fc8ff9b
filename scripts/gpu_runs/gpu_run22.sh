#!/usr/bin/env bash
# Next session (~6 min): end to end with the Mosaic GPU NF4 kernels in every projection
# (ForwardOptions.matmul_variant="mosaic": x·Wᵀ and dy·W decoded in registers, W repacked per
# call) against the default (XLA decode, then cuBLAS), at both benchmark shapes, one machine.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000" | tee -a $OUT/bench.log | tail -5; }
timeout 200 python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host \
  --cases "2x2048@mlp@auto" "1x8192@mlp:19,selective@auto" --json $OUT/lorax_xla.json 2>&1 | quiet
timeout 260 python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host \
  --forward matmul_variant=mosaic \
  --cases "2x2048@mlp@auto" "1x8192@mlp:19,selective@auto" --json $OUT/lorax_mosaic.json 2>&1 | quiet
