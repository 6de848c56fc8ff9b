#!/usr/bin/env bash
# Issue 7 (~5 min): 1x8192 `selective:12,mlp` with XLA's scheduler told the real memory budget
# (--xla_gpu_memory_limit_slop_factor=15: 0.25 GiB fewer temporaries at compile time,
# gpu_run25.sh), its measured peak and speed, then Unsloth on the same machine.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -5; }
XLA_FLAGS=--xla_gpu_memory_limit_slop_factor=15 timeout 200 python3 scripts/bench_train.py \
  --steps 8 --warmup 3 --embeddings-on-host \
  --cases "1x8192@selective:12,mlp@auto" "1x8192@selective:11,mlp@auto" \
  --json $OUT/lorax_8k_slop15.json 2>&1 | quiet
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 250 python3 scripts/bench_torch.py --systems unsloth --shapes 1x8192 --deadline-s 240 \
  --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -3 $OUT/torch.log
