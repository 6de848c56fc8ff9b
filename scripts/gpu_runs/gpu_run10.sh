#!/usr/bin/env bash
# Session 2026-11-29 (3rd) call 3: layer inputs offloaded to pinned host memory, the freed
# device memory spent on more `mlp` layers at 1x8192 (embedding table on the host too).
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
B="python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host --forward offload_layer_inputs=true"
: > $OUT/bench.log
for N in 19 22 24 26; do
  timeout 85 $B --cases "1x8192@mlp:$N,selective@auto" --json $OUT/lorax_8k_off_$N.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
  echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
done
