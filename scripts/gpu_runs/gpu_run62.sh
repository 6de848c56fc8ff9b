#!/usr/bin/env bash
# GPU call (~8 min, run with carry .gpu): the Mosaic attention kernels with a sliding window and
# a softcap. bench_attention: plain causal (regression check against the last session), windows
# of 4096 and 1024 (cuDNN takes them natively; Triton as before), softcap 50 (Triton; cuDNN
# without it as the anchor), and packed rows with a window. Output: $OUT/*.log, *.json
set -u
source scripts/gpu_env.sh
bench causal --shapes 2x2048,1x8192,1x32768 --impls mosaic,cudnn
bench window4096 --shapes 1x8192,1x32768 --window 4096 --impls mosaic,cudnn,pallas
bench window1024 --shapes 1x8192,1x32768 --window 1024 --impls mosaic,cudnn,pallas
bench softcap50 --shapes 2x2048,1x8192,1x32768 --softcap 50 --impls mosaic,pallas,cudnn
bench segments_window --shapes 1x8192,1x32768 --segments 2048 --window 1024 --impls mosaic,pallas
