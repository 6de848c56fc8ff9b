#!/usr/bin/env bash
# Session 2026-11-29 (3rd) call 5: the published lorax rows at the final tree (Unsloth's rows
# are call 2's, same session).
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
B="python3 scripts/bench_train.py --steps 8 --warmup 3"
: > $OUT/bench.log
timeout 75 $B --cases 2x2048@mlp@auto --json $OUT/lorax_2k.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 85 $B --embeddings-on-host --cases "1x8192@mlp:19,selective@auto" --json $OUT/lorax_8k.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 75 $B --embeddings-on-host --chunk 128 --cases 2x2048@offload@auto --json $OUT/lorax_lowmem_2k.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 85 $B --embeddings-on-host --chunk 128 --forward mlp_chunk_tokens=4096 --cases 1x8192@offload@auto --json $OUT/lorax_lowmem_8k.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
