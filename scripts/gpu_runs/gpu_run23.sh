#!/usr/bin/env bash
# Issue 7 (~8 min): does putting the `selective` layers first in the remat schedule lower the
# 1x8192 peak? The backward starts at the last segment; when that segment is `selective`, its
# recomputed gate/up projections (~0.45 GiB) are live on top of every saved activation, so
# `mlp` last should cost less peak and pay for one more `mlp` layer. Then Unsloth on the same
# machine. Needs the .gpu and .site carry folders (see gpu_run13.sh).
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000" | tee -a $OUT/bench.log | tail -5; }
timeout 250 python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host \
  --cases "1x8192@selective:13,mlp@auto" "1x8192@selective:12,mlp@auto" \
  "1x8192@selective:11,mlp@auto" "1x8192@selective:10,mlp@auto" \
  --json $OUT/lorax_8k_order.json 2>&1 | quiet
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 250 python3 scripts/bench_torch.py --systems unsloth --shapes 1x8192 --deadline-s 240 \
  --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -5 $OUT/torch.log
