#!/usr/bin/env bash
# Issue 4 (~5 min): where the prepared path (lorax.prepare_kernel_weights) loses end to end
# (call 2 of 2026-11-29 s10: 14,974 vs 15,136 tok/s at 2x2048, 12,186 vs 12,617 at 1x8192):
# the step's device time by HLO op, prepared against default, and both optimized HLO texts.
# Carry .gpu. 6 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
prof() {  # TIMEOUT NAME ARGS...
  t=$1; n=$2; shift 2
  timeout $t python3 scripts/profile_train.py --steps 3 --warmup 2 --top 60 "$@" 2>&1 \
    | grep -v "^W0000\|^I0000\|host_offloader" > $OUT/$n.log
  grep -m3 "step\|total" $OUT/$n.log
}
prof 80 default_2k --case "2x2048:mlp" --hlo /tmp/default_2k.hlo
prof 90 prepared_2k --case "2x2048:mlp" --prepare-kernel-weights --hlo /tmp/prepared_2k.hlo
gzip -c /tmp/default_2k.hlo > $OUT/default_2k.hlo.gz
gzip -c /tmp/prepared_2k.hlo > $OUT/prepared_2k.hlo.gz
prof 80 default_8k --case "1x8192:selective:12,mlp" --embeddings-on-host
prof 90 prepared_8k --case "1x8192:selective:12,mlp" --embeddings-on-host --prepare-kernel-weights
