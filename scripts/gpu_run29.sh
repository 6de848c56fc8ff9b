#!/usr/bin/env bash
# Issue 7, next session (~6 min): XLA flags that may speed up the 1x8192 step at the same
# memory (selective:12,mlp: 12,504 tok/s at 23.84 GiB vs Unsloth 9,619, 1.2999x): all GEMMs
# on cuBLAS instead of Triton fusions, the latency-hiding scheduler off, a mild scheduler
# memory limit; then Unsloth on the same machine. Carry .gpu and .site.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -2; }
case8k() {  # NAME [XLA_FLAGS]
  echo "== $1 ${2:-}" | tee -a $OUT/bench.log
  XLA_FLAGS="${2:-}" timeout 100 python3 scripts/bench_train.py --steps 8 --warmup 3 \
    --embeddings-on-host --cases "1x8192@selective:12,mlp@auto" --json $OUT/lorax_$1.json \
    2>&1 | quiet
}
case8k default
case8k cublas --xla_gpu_enable_triton_gemm=false
case8k no_lhs --xla_gpu_enable_latency_hiding_scheduler=false
case8k slop50 --xla_gpu_memory_limit_slop_factor=50
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 250 python3 scripts/bench_torch.py --systems unsloth --shapes 1x8192 --deadline-s 240 \
  --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -3 $OUT/torch.log
