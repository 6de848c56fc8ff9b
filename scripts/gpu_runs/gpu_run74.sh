#!/usr/bin/env bash
# GPU call (~7 min, carry .gpu): the attention table at the backward's new register default
# (240/24, gpu_run72), with the options the model uses: causal against cuDNN at 2x2048 /
# 1x8192 / 1x32768, then packed rows (1024-token examples), a 4096 window (with cuDNN) and
# softcap 50 at 1x8192. Output: $OUT/{causal,segments,window4096,softcap50}.{log,json}.
set -u
source scripts/gpu_env.sh
BENCH_TIMEOUT=200 BENCH_BUDGET=170 bench causal --shapes 2x2048,1x8192,1x32768 --impls mosaic,cudnn
bench segments --segments 1024 --shapes 1x8192 --impls mosaic
bench window4096 --window 4096 --shapes 1x8192 --impls mosaic,cudnn
bench softcap50 --softcap 50 --shapes 1x8192 --impls mosaic
