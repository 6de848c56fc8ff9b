#!/usr/bin/env bash
# Issue 7 (~8 min): grouped projections decoded as one matrix and the LoRA up-projections
# folded into the base GEMM (this tree) against the tree before (.ab_old = git archive 1795e7a)
# at 1x8192 selective:12,mlp, the same call; this tree at selective:11,mlp (if the peak
# dropped), 2x2048 mlp, and the low-memory 1x8192 / 2x2048 rows; then Unsloth at 1x8192.
# Carry .gpu, .site and .ab_old. 8 files back.
set -u
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -3; }
bench() {  # TIMEOUT JSON ARGS...
  t=$1; j=$2; shift 2
  timeout $t python3 scripts/bench_train.py --steps 8 --warmup 3 --json $OUT/$j "$@" 2>&1 | quiet
}
ROOT=$PWD
echo "== old tree" | tee -a $OUT/bench.log
(cd .ab_old && export PYTHONPATH=$ROOT/.gpu:$ROOT/.ab_old && bench 60 lorax_8k_old.json --embeddings-on-host \
  --cases "1x8192@selective:12,mlp@auto")
echo "== this tree" | tee -a $OUT/bench.log
export PYTHONPATH=$ROOT/.gpu:$ROOT:${PYTHONPATH:-}
bench 110 lorax_8k.json --embeddings-on-host \
  --cases "1x8192@selective:12,mlp@auto" "1x8192@selective:11,mlp@auto"
bench 50 lorax_2k.json --cases "2x2048@mlp@auto"
bench 65 lowmem_8k.json --embeddings-on-host --chunk 128 --forward mlp_chunk_tokens=4096 \
  --cases "1x8192@offload@auto"
bench 50 lowmem_2k.json --embeddings-on-host --chunk 128 --cases "2x2048@offload@auto"
export PYTHONPATH=$ROOT/.site:$PYTHONPATH
timeout 230 python3 scripts/bench_torch.py --systems unsloth --shapes 1x8192 --deadline-s 220 \
  --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -3 $OUT/torch.log
