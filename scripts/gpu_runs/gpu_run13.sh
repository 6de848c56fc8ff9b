#!/usr/bin/env bash
# Session 2026-11-29 (3rd) call 6: Unsloth and the lorax 1x8192 speed row again, on one machine
# in one call (call 5's machine was a fresh one, Unsloth's call-2 rows ran on another).
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
: > $OUT/bench.log
timeout 85 python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host \
  --cases "1x8192@mlp:19,selective@auto" --json $OUT/lorax_8k.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 250 python3 scripts/bench_torch.py --systems unsloth --deadline-s 240 --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -5 $OUT/torch.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
