#!/usr/bin/env bash
# Session 2026-11-29 (4th) call 7: lorax 1x8192 with cuDNN vs Mosaic GPU attention, one machine.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
timeout 230 python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host \
  --cases "1x8192@mlp:19,selective@auto" "1x8192@mlp:19,selective@mosaic" "1x8192@mlp:20,selective@mosaic" \
  --json $OUT/lorax_8k_attention.json 2>&1 | grep -v "^jax\|^W0000\|^I0000" | tee -a $OUT/bench.log | tail -20
