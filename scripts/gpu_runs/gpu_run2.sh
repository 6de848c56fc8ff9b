#!/usr/bin/env bash
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
git log -1 --format=%H 2>/dev/null
timeout 560 python3 scripts/bench_train.py --steps 10 --warmup 3 --json $OUT/train2.json \
  --cases 2x2048:selective:auto,2x2048:full:auto,2x2048:offload:auto,1x8192:selective:auto,1x8192:full:auto,1x8192:offload:auto,2x2048:none:auto 2>&1 | tee $OUT/train2.log
