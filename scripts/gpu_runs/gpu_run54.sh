#!/usr/bin/env bash
# Issue 4 (~5 min): the token tile now shrinks when a launch would leave most SMs idle
# (MgpuNF4Config.fill_sms; call 4: 64-token tiles 1.55-2.2x one 256-token tile at M = 256).
# (A) correctness and single-call time at full size, both orientations, M = 64-512, default
# config, on the few-tile shapes. (B) per-layer device time at M = 64-512 (scan).
# (C) end to end at 1x512, default vs prepared (what kernel_weights="auto" does there). 4 files.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
quiet() { grep -v "^W0000\|^I0000\|host_offloader"; }
timeout 150 python3 scripts/check_nf4_matmul_mgpu.py --ms 64,256,512 \
  --shapes 14336x4096,4096x4096,4096x6144 --budget-s 140 2>&1 | quiet > $OUT/check.log
grep -c " ok " $OUT/check.log; grep -i "error\|fail\|BAD" $OUT/check.log | head -5
timeout 130 python3 scripts/bench_nf4_matmul.py --ms 64,256,512 --modes fwd,fwd+bwd --no-extras \
  --scan-mb 200 --variants bf16_dot,reference,mosaic --reps 5 --budget-s 110 \
  --json $OUT/scan.json 2>&1 | quiet > $OUT/scan.log
tail -2 $OUT/scan.log
: > $OUT/bench.log
for prep in "" "--prepare-kernel-weights"; do
  timeout 60 python3 scripts/bench_train.py --steps 10 --warmup 3 $prep --cases "1x512@none@auto" \
    2>&1 | grep -v "^jax" | quiet | tee -a $OUT/bench.log | tail -1
done
