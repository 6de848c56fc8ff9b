#!/usr/bin/env bash
# Issue 7 (~2 min, compile only): what is live at the 1x8192 step's peak device memory under
# the remat schedules that just miss 24 GiB, by buffer and by JAX operation.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}  # .gpu: gguf (carry it)
export PYTHONUNBUFFERED=1
for remat in selective:12,mlp selective:10,mlp; do
  timeout 200 python3 scripts/peak_memory_report.py --shape 1x8192 --remat $remat \
    --embeddings-on-host --top 40 --min-pct 0.4 --dump-dir /tmp/dump_${remat//[:,]/_} 2>&1 \
    | grep -v "^W0000\|^I0000" > $OUT/peak_${remat//[:,]/_}.txt
  head -50 $OUT/peak_${remat//[:,]/_}.txt
done
