#!/usr/bin/env bash
# Ran at c68709c (2026-11-30, ninth session); ncu stopped at the dQ kernel ("Failed to profile"),
# before cuDNN's (gpu_run96.sh has them); "fused3" was removed after it.
# Raw output: scripts/results/h200-2026-11-30-s9/run95/.
# GPU call (~4 min, carry .gpu; 2026-11-30, ninth session): Nsight Compute on one launch of each
# backward kernel at 1x32768 — the fused (two roles), three-role, dK/dV + dQ kernels, and
# cuDNN's — for what bounds them (tensor pipe, shared memory, stalls), not only how long they
# take. Output: $OUT/ncu_{details,raw}.txt (and the forward kernels, which the filter also takes).
set -u
source scripts/gpu_env.sh
ncu --version | tail -1
timeout 420 ncu --clock-control none --set full -k 'regex:lorax_mgpu|sdpa|fmha|flash|attn' -c 12 \
  -f -o $OUT/att python3 scripts/profile_attention_kernels.py --shape 1x32768 \
  --impls fused,fused3,kernel,cudnn 2>&1 | q | grep -v "^==PROF==" | tail -20
ncu -i $OUT/att.ncu-rep --page details > $OUT/ncu_details.txt 2>&1
ncu -i $OUT/att.ncu-rep --page raw --csv > $OUT/ncu_raw.csv 2>&1
ls -la $OUT; rm -f $OUT/att.ncu-rep
grep -E "^  [a-z_]|Duration|Compute \(SM\) Throughput|Memory Throughput|Shared|Issue Slots Busy|Registers Per" \
  $OUT/ncu_details.txt | head -80
