#!/usr/bin/env bash
# GPU call (~3 min, run with carry .gpu): head dim 96 (Phi-3's) on the Mosaic kernels, zero-
# padded to 128, against the Triton kernels (what it took before) and cuDNN (native 96):
# packed rows (the model's case for the kernels) and unpacked causal. Output: $OUT/*.log, *.json
set -u
source scripts/gpu_env.sh
bench d96_packed --head-dim 96 --shapes 2x2048,1x8192 --segments 1024 --impls mosaic,pallas
bench d96_causal --head-dim 96 --shapes 2x2048,1x8192 --impls mosaic,pallas,cudnn
