#!/usr/bin/env bash
# Issue 7 (~9 min): where the 1x8192 headline step's time goes now (profile of
# selective:12,mlp with embeddings on host), then XLA flags that may speed it up at the same
# memory (all GEMMs on cuBLAS, cuBLASLt, the latency-hiding scheduler off, a mild scheduler
# memory limit), then Unsloth on the same machine. Carry .gpu and .site.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -2; }
timeout 150 python3 scripts/profile_train.py --case "1x8192:selective:12,mlp" --embeddings-on-host \
  --steps 3 --warmup 2 --top 60 --json $OUT/profile_8k.json > $OUT/profile_8k.md 2>&1
grep -A12 "device-busy" $OUT/profile_8k.md
case8k() {  # NAME [XLA_FLAGS]
  echo "== $1 ${2:-}" | tee -a $OUT/bench.log
  XLA_FLAGS="${2:-}" timeout 100 python3 scripts/bench_train.py --steps 8 --warmup 3 \
    --embeddings-on-host --cases "1x8192@selective:12,mlp@auto" --json $OUT/lorax_$1.json \
    2>&1 | quiet
}
case8k default
case8k cublas --xla_gpu_enable_triton_gemm=false
case8k cublaslt --xla_gpu_enable_cublaslt=true
case8k no_lhs --xla_gpu_enable_latency_hiding_scheduler=false
case8k slop50 --xla_gpu_memory_limit_slop_factor=50
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 250 python3 scripts/bench_torch.py --systems unsloth --shapes 1x8192 --deadline-s 240 \
  --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -3 $OUT/torch.log
