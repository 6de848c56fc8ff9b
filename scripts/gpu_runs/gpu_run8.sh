#!/usr/bin/env bash
# Session 2026-11-29 (3rd) call 1: grouped projections + LM-head gradient in the forward,
# A/B against the previous tree (.ab_old = git archive of 03162b6), and the pinned-host
# embedding probe.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -x tests/test_nf4_matmul.py tests/test_loss.py \
  -k "group or reference or chunk or frozen or head" 2>&1 | tail -3 | tee $OUT/bench.log
timeout 90 python3 scripts/check_host_embedding.py 2>&1 | grep -v Deprecat | tee $OUT/host_embedding.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
B="python3 scripts/bench_train.py --steps 8 --warmup 3"
(cd .ab_old && PYTHONPATH=$PWD/../.gpu:$PWD timeout 80 $B --cases "1x8192@mlp:16,selective@auto" \
  2>&1 | grep -v "^jax" | sed 's/^/OLD /' | tee -a $OUT/bench.log)
timeout 80 $B --cases "1x8192@mlp:16,selective@auto" --json $OUT/new_8k.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 70 $B --cases 2x2048@mlp@auto --json $OUT/new_2k.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
(cd .ab_old && PYTHONPATH=$PWD/../.gpu:$PWD timeout 70 $B --chunk 128 --cases 2x2048@offload@auto \
  2>&1 | grep -v "^jax" | sed 's/^/OLD /' | tee -a $OUT/bench.log)
timeout 70 $B --chunk 128 --cases 2x2048@offload@auto --json $OUT/new_lowmem_2k.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 80 $B --cases "1x8192@mlp:18,selective@auto" 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
