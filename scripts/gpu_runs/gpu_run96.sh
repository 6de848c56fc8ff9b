#!/usr/bin/env bash
# Ran at 4d78ee3 (2026-11-30, ninth session); fused_dq_split was 18% slower at 1x32768 and was
# removed (the 2x2048 line ran past its timeout). Raw output: scripts/results/h200-2026-11-30-s9/run96/.
# GPU call (~6 min, carry .gpu; 2026-11-30, ninth session): (1) Nsight Compute on cuDNN's
# forward and backward at 1x32768 (run95 stopped before them), for its tensor-pipe and
# shared-memory utilization beside the Mosaic kernels'; (2) the fused backward with its dQ product
# in two column blocks, the first issued with dK (fused_dq_split), against the fused default,
# at 1x32768 and 2x2048. Offline at 1x32768: warpgroup 1's hot loops ~740 instructions,
# 40 wgmmas, 21-25 local loads (unsplit: ~655, 32, 5).
# Output: $OUT/ncu_cudnn_{details.txt,raw.csv}, $OUT/split_{32k,2k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
timeout 240 ncu --clock-control none --set full -k 'regex:sdpa|fmha|flash|attn|cudnn' -c 4 \
  -f -o $OUT/cudnn python3 scripts/profile_attention_kernels.py --shape 1x32768 \
  --impls cudnn 2>&1 | q | grep -v "^==PROF==" | tail -5
ncu -i $OUT/cudnn.ncu-rep --page details > $OUT/ncu_cudnn_details.txt 2>&1
ncu -i $OUT/cudnn.ncu-rep --page raw --csv > $OUT/ncu_cudnn_raw.csv 2>&1
rm -f $OUT/cudnn.ncu-rep
grep -E "^  [a-zA-Z_]|Duration|SM Frequency|Compute \(SM\) Throughput|Registers Per|Dynamic Shared" \
  $OUT/ncu_cudnn_details.txt | head -30
logged split_32k timeout 200 python3 scripts/check_mgpu_attention.py --shapes 1x32768 --no-cudnn \
  --variants "fused split,fused,fused split r240"
logged split_2k timeout 60 python3 scripts/check_mgpu_attention.py --shapes 2x2048 --no-cudnn \
  --variants "fused split,fused"
cat $OUT/summary.txt | grep -v "spill"
