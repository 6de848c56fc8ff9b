#!/usr/bin/env bash
# Next session (~7 min): can MLP token chunking pay for more `mlp` layers at 1x8192 within
# 24 GiB (issue 7 misses 1.3x Unsloth by 0.4%)? lorax mlp:19 as today, then mlp:20/21 with
# the MLP in 4096-token chunks (smaller backward temporaries), then Unsloth on the same
# machine. Needs the .gpu and .site carry folders (see gpu_run13.sh).
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000" | tee -a $OUT/bench.log | tail -5; }
timeout 120 python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host \
  --cases "1x8192@mlp:19,selective@auto" --json $OUT/lorax_8k.json 2>&1 | quiet
timeout 220 python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host \
  --forward mlp_chunk_tokens=4096 \
  --cases "1x8192@mlp:20,selective@auto" "1x8192@mlp:21,selective@auto" \
  --json $OUT/lorax_8k_chunked.json 2>&1 | quiet
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 250 python3 scripts/bench_torch.py --systems unsloth --shapes 1x8192 --deadline-s 240 \
  --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -5 $OUT/torch.log
