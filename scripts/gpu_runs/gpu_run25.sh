#!/usr/bin/env bash
# Issue 7 (~3 min, compile only): XLA's latency-hiding scheduler budgets memory against
# ~76% of the H200's 141 GiB, so at 24 GiB it is never under pressure. Does telling it the
# real budget (a lower --xla_gpu_memory_limit_slop_factor, or the allocator's fraction)
# lower the 1x8192 step's temporaries enough for one more `mlp` layer?
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}  # .gpu: gguf (carry it)
export PYTHONUNBUFFERED=1
report() {  # NAME REMAT [env assignments...]
  local name=$1 remat=$2; shift 2
  env "$@" timeout 150 python3 scripts/peak_memory_report.py --shape 1x8192 --remat $remat \
    --embeddings-on-host --top 30 --min-pct 0.4 --dump-dir /tmp/dump_$name 2>&1 \
    | grep -v "^W0000\|^I0000\|host_offloader" > $OUT/peak_$name.txt
  echo "== $name $remat $*"; grep "XLA memory\|live at\|Error" $OUT/peak_$name.txt
}
report s12_default selective:12,mlp
report s12_slop15 selective:12,mlp XLA_FLAGS=--xla_gpu_memory_limit_slop_factor=15
report s12_slop13 selective:12,mlp XLA_FLAGS=--xla_gpu_memory_limit_slop_factor=13
report s12_frac17 selective:12,mlp XLA_PYTHON_CLIENT_MEM_FRACTION=0.17
report s12_lhs14 selective:12,mlp \
  "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_memory_limit_slop_factor=14"
