#!/usr/bin/env bash
# Issue 7 (~2.5 min): where the 1x8192 headline step's time goes (selective:12,mlp, embeddings
# on host), kernel by kernel: command buffers off, or the trace shows only the buffers.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 200 python3 scripts/profile_train.py \
  --case "1x8192:selective:12,mlp" --embeddings-on-host --steps 3 --warmup 2 --top 120 \
  --json $OUT/profile_8k.json --hlo $OUT/step_8k.hlo > $OUT/profile_8k.md 2>&1
grep -v "^W1\|^I1\|host_offloader" $OUT/profile_8k.md | head -60
