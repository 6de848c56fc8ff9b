#!/usr/bin/env bash
# GPU call (~4 min): end to end at 1x8192 on one machine: lorax with cuDNN attention (8 timed
# steps, after the attention_out residual fix), then Unsloth for a same-machine ratio. Needs
# the .gpu and .site carry folders (see gpu_run13.sh).
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
timeout 200 python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host \
  --cases "1x8192@mlp:19,selective@auto" \
  --json $OUT/lorax_8k.json 2>&1 | grep -v "^jax\|^W0000\|^I0000" | tee -a $OUT/bench.log | tail -5
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 250 python3 scripts/bench_torch.py --systems unsloth --shapes 1x8192 --deadline-s 240 \
  --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -5 $OUT/torch.log
