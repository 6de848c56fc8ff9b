#!/usr/bin/env bash
# Issue 4 (~7 min): where does preparing the kernel weights stop paying end to end? Call 2 had
# +14.9% at 1x1024 and +3.7% at 1x2048 (one run each); the tenth session -1.1% at 2x2048.
# Default vs all groups prepared, in pairs, at 1x1024, 2x1024, 1x2048 and 1x4096 (remat
# none): the threshold of kernel_weights="auto" (lorax.kernel_weights.AUTO_MAX_TOKENS).
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
mkdir -p $OUT/json
: > $OUT/bench.log
bench() {  # TIMEOUT JSON ARGS...
  t=$1; j=$2; shift 2
  timeout $t python3 scripts/bench_train.py --steps 10 --warmup 3 --json $OUT/json/$j "$@" 2>&1 \
    | grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -1
}
for shape in 1x1024 2x1024 1x2048 1x4096; do
  bench 60 xla_$shape.json --cases "$shape@none@auto"
  bench 65 all_$shape.json --prepare-kernel-weights --cases "$shape@none@auto"
done
tar -C $OUT -czf $OUT/json.tgz json && rm -rf $OUT/json
