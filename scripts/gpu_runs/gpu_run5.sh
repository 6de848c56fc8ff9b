#!/usr/bin/env bash
# Session 2026-11-29 call 3: cuDNN residuals kept under remat, XLA vs Pallas decode end to end,
# low-memory variants, and the lorax max-context table.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
timeout 60 python3 -m pytest -q -x tests/test_flash_attention.py -k "cudnn_forward_residuals" 2>&1 | tail -3 | tee $OUT/bench.log
timeout 250 python3 scripts/bench_max_context.py --deadline-s 230 --forward mlp_chunk_tokens=4096 \
  --json $OUT/max_context.json > $OUT/max_context.log 2>&1
tail -30 $OUT/max_context.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
B="python3 scripts/bench_train.py --steps 8 --warmup 3"
R=matmul_impl=reference
timeout 60 $B --forward $R --cases 2x2048@mlp@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 70 $B --forward $R --cases 1x8192@mlp:16,selective@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 70 $B --cases 1x8192@mlp:16,selective@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 60 $B --chunk 128 --forward $R --cases 2x2048@offload@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 70 $B --chunk 128 --forward $R,mlp_chunk_tokens=4096 --cases 1x8192@offload@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
