#!/usr/bin/env bash
# Issue 4 (~5 min, not yet run): end to end, lorax.prepare_kernel_weights (projection groups
# on the Mosaic GPU NF4 kernel, LoRA in its reduction) against the default at 2x2048 and
# 1x8192, same call. Carry .gpu. 5 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -2; }
bench() {  # TIMEOUT JSON ARGS...
  t=$1; j=$2; shift 2
  timeout $t python3 scripts/bench_train.py --steps 8 --warmup 3 --json $OUT/$j "$@" 2>&1 | quiet
}
bench 50 xla_2k.json --cases "2x2048@mlp@auto"
bench 70 prepared_2k.json --prepare-kernel-weights --cases "2x2048@mlp@auto"
bench 60 xla_8k.json --embeddings-on-host --cases "1x8192@selective:12,mlp@auto"
bench 80 prepared_8k.json --embeddings-on-host --prepare-kernel-weights \
  --cases "1x8192@selective:12,mlp@auto"
