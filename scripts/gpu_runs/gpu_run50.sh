#!/usr/bin/env bash
# Issue 4 (~7 min): the decode-sized regime, never measured before. (A) forward at M = 1, 16,
# 64, 256 on the four Llama-8B shapes: every variant, W GB/s against the ~4.3 TB/s copy rate.
# (B) forward+backward at M = 256-2048: where "auto" should switch from the fused kernel to
# XLA's decode + cuBLAS (fused_max_m, an estimate until now). 3 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit --format=csv | tee $OUT/gpu.txt
timeout 290 python3 scripts/bench_nf4_matmul.py --ms 1,16,64,256 --modes fwd --no-extras \
  --variants bf16_dot,reference,fused,dequant,mosaic,mosaic+prep --reps 7 --budget-s 260 \
  --json $OUT/small_m_fwd.json 2>&1 | grep -v "^W0000\|^I0000" > $OUT/small_m.log
tail -3 $OUT/small_m.log
timeout 230 python3 scripts/bench_nf4_matmul.py --ms 512,256,1024,2048 --modes fwd+bwd --no-extras \
  --variants bf16_dot,reference,fused,mosaic --reps 7 --budget-s 200 \
  --json $OUT/crossover.json 2>&1 | grep -v "^W0000\|^I0000" >> $OUT/small_m.log
tail -3 $OUT/small_m.log
