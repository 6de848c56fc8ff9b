#!/usr/bin/env bash
# GPU call (~2 min, run with carry .gpu): 2x2048 `mlp`, packed rows (mean example 1024) with the
# default attention (Mosaic) and the Triton kernels, then the same shape unpacked (cuDNN) as the
# anchor. Output: $OUT/bench_train_packed_2k.*, $OUT/bench_train_unpacked_2k.*
set -u
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD PYTHONUNBUFFERED=1
q() { grep -v "^W0000\|^I0000\|UserWarning\|warnings.warn"; }
timeout 300 python3 scripts/bench_train.py --cases "2x2048@mlp@auto" "2x2048@mlp@pallas" \
  --packed 1024 --steps 8 --warmup 3 --json $OUT/bench_train_packed_2k.json 2>&1 | q \
  | tee $OUT/bench_train_packed_2k.log
timeout 150 python3 scripts/bench_train.py --cases "2x2048@mlp@auto" --steps 8 --warmup 3 \
  --json $OUT/bench_train_unpacked_2k.json 2>&1 | q | tee $OUT/bench_train_unpacked_2k.log
