#!/usr/bin/env bash
# Ran at a73c623 (2026-11-30, ninth session); bwd_dq="fused3" was 4-6% slower than "fused" at
# every shape and was removed. Raw output: scripts/results/h200-2026-11-30-s9/run94/.
# GPU call (~8 min, carry .gpu; 2026-11-30, ninth session): the three-role fused backward
# (bwd_dq="fused3": the memory warpgroup computes and reduce-adds the dQ partials; P and dS
# warpgroups in two row blocks of 64 keys), first alone at 2x2048 (correctness against float32;
# a hang stops the call there), then timed against cuDNN, the default and "fused" at 1x32768
# and 1x8192. Offline at 1x32768 (scripts/ptxas_report.py): no setmaxnreg loss at 200/208/96;
# hot loops ~515 instructions (13 local loads) and ~540 (4), the dQ loop 310 (none).
# Output: $OUT/f3_{2k,32k,8k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
export MOSAIC_GPU_DUMP_PTXAS=1
logged f3_2k timeout 150 python3 scripts/check_mgpu_attention.py --shapes 2x2048 --no-cudnn \
  --variants "fused3"
if ! grep -q "fused3 .*TFLOP" $OUT/f3_2k.log; then echo "fused3 failed at 2x2048: stop"; exit 1; fi
logged f3_32k timeout 300 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --variants "fused3,fused3 r208,fused,default"
logged f3_8k timeout 100 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "fused3,default"
logged f3_2k_all timeout 60 python3 scripts/check_mgpu_attention.py --shapes 2x2048 \
  --variants "default,fused"
