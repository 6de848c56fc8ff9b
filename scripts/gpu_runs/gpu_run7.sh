#!/usr/bin/env bash
# Session 2026-11-29 call 5: the single-GPU sharding check (issue 8) and one lorax max-context
# row verified by running under a 12 GiB XLA allocator cap.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
timeout 90 python3 scripts/check_sharding_gpu.py 2>&1 | grep -v Deprecation | tail -30 | tee $OUT/sharding_check.log
echo "elapsed $(( $(date +%s) - T0 ))s"
FRAC=$(python3 -c "print(12 * 2**30 / $(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits) / 2**20)")
echo "mem fraction for 12 GiB: $FRAC" | tee $OUT/maxctx_run.log
for S in 63488 57344; do
  timeout 110 python3 scripts/bench_train.py --steps 1 --warmup 1 --mem-fraction $FRAC \
    --forward mlp_chunk_tokens=4096 --json $OUT/maxctx_run_$S.json --cases 1x$S@offload@auto 2>&1 | grep -v "^jax" | tee -a $OUT/maxctx_run.log
  grep -q "tok/s" $OUT/maxctx_run.log && break
  echo "elapsed $(( $(date +%s) - T0 ))s"
done
echo "elapsed $(( $(date +%s) - T0 ))s"
