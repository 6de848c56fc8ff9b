#!/usr/bin/env bash
# Session 2026-11-29 (3rd) call 4: LM-head loss chunk size at 1x8192 (fewer, larger vocab
# GEMMs now that the head gradient is computed in the forward).
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
B="python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host"
: > $OUT/bench.log
for C in 512 1024; do
  timeout 85 $B --chunk $C --cases "1x8192@mlp:19,selective@auto" --json $OUT/lorax_8k_19_c$C.json 2>&1 | grep -v "^jax" | sed "s/^/chunk $C /" | tee -a $OUT/bench.log
done
timeout 85 $B --chunk 1024 --cases "1x8192@mlp:18,selective@auto" --json $OUT/lorax_8k_18_c1024.json 2>&1 | grep -v "^jax" | sed "s/^/chunk 1024 /" | tee -a $OUT/bench.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
