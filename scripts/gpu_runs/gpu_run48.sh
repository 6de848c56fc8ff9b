#!/usr/bin/env bash
# Issue 4 (~2 min): is the NF4 kernel power-limited? SM clock, power and temperature while
# cuBLAS, XLA's decode+dot and the Mosaic kernel each run back to back for 4 s, at a long
# call (gate 4096x14336 and down 14336x4096 at M = 16384) and a short one (o, M = 4096).
# Carry .gpu. 1 file back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,clocks_throttle_reasons.active --format=csv \
  | tee $OUT/power.log
for args in "--m 16384 --shape 4096x14336" "--m 16384 --shape 14336x4096" "--m 4096 --shape 4096x4096"; do
  timeout 80 python3 scripts/probe_power_nf4.py --seconds 4 $args 2>&1 \
    | grep -v "^W0000\|^I0000" | tee -a $OUT/power.log
done
