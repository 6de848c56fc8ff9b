#!/usr/bin/env bash
# Issue 7 (~9.5 min): the step's new default XLA options (cuBLASLt on; the latency-hiding
# scheduler off for an unsharded step) against XLA's own, at 1x8192 selective:12,mlp (and
# selective:11,mlp if the lower peak holds one more mlp layer) and the
# low-memory 1x8192 rows (offload, and offload:28,selective spending the headroom under
# Unsloth's peak; and offload with the scheduler on, which host copies may need); then Unsloth on the same machine. Carry .gpu and .site. 7 files back.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -3; }
bench() {  # TIMEOUT JSON ARGS...
  t=$1; j=$2; shift 2
  timeout $t python3 scripts/bench_train.py --steps 8 --warmup 3 --json $OUT/$j "$@" 2>&1 | quiet
}
bench 110 lorax_8k_default.json --embeddings-on-host \
  --cases "1x8192@selective:12,mlp@auto" "1x8192@selective:11,mlp@auto"
bench 60 lorax_8k_xla_own.json --embeddings-on-host --compiler-options none \
  --cases "1x8192@selective:12,mlp@auto"
bench 130 lowmem_8k.json --embeddings-on-host --chunk 128 --forward mlp_chunk_tokens=4096 \
  --cases "1x8192@offload@auto" "1x8192@offload:28,selective@auto"
bench 65 lowmem_8k_lhs.json --embeddings-on-host --chunk 128 --forward mlp_chunk_tokens=4096 \
  --compiler-options xla_gpu_enable_cublaslt=true --cases "1x8192@offload@auto"
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 230 python3 scripts/bench_torch.py --systems unsloth --shapes 1x8192 --deadline-s 220 \
  --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -3 $OUT/torch.log
