#!/usr/bin/env bash
# Issue 7 (~6 min): the speed rows and the 1x8192 low-memory row again, beside Unsloth at both
# shapes in one call
# (this tree: grouped projections decoded once, LoRA folded into the base GEMM). Carry .gpu
# and .site. 5 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -3; }
bench() {  # TIMEOUT JSON ARGS...
  t=$1; j=$2; shift 2
  timeout $t python3 scripts/bench_train.py --steps 8 --warmup 3 --json $OUT/$j "$@" 2>&1 | quiet
}
bench 60 lorax_8k.json --embeddings-on-host --cases "1x8192@selective:12,mlp@auto"
bench 45 lorax_2k.json --cases "2x2048@mlp@auto"
bench 65 lowmem_8k.json --embeddings-on-host --chunk 128 --forward mlp_chunk_tokens=4096 \
  --cases "1x8192@offload@auto"
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 200 python3 scripts/bench_torch.py --systems unsloth --shapes 2x2048,1x8192 \
  --deadline-s 190 --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -4 $OUT/torch.log
