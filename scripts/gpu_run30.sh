#!/usr/bin/env bash
# Issue 7, next session (~5 min): the low-memory row has ~1.15 GiB of headroom under Unsloth's
# 8.03 GiB at 1x8192 (6.88 GiB, 1.00x Unsloth's speed in its session): spend it on a few layers
# that keep their attention inputs and output (selective: ~224 MiB each, no attention or q/k/v
# recompute) instead of offloading everything, those layers last (the backward starts
# there). `mlp` layers are no use here: the chunked MLP recomputes its chunks anyway. Carry .gpu.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -4; }
timeout 280 python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host --chunk 128 \
  --forward mlp_chunk_tokens=4096 \
  --cases "1x8192@offload@auto" "1x8192@offload:28,selective@auto" \
  "1x8192@offload:27,selective@auto" --json $OUT/lowmem_8k.json 2>&1 | quiet
