#!/usr/bin/env bash
# Issue 7 (~4.5 min): 1x8192 with the benchmark no longer holding the caller's initial LoRA
# adapters (160 MiB) beside the state's copy: `selective:12,mlp` (24.0007 GiB before) and
# `selective:13,mlp`, then Unsloth on the same machine.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -5; }
timeout 200 python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host \
  --cases "1x8192@selective:12,mlp@auto" "1x8192@selective:13,mlp@auto" \
  --json $OUT/lorax_8k.json 2>&1 | quiet
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 250 python3 scripts/bench_torch.py --systems unsloth --shapes 1x8192 --deadline-s 240 \
  --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -3 $OUT/torch.log
