#!/usr/bin/env bash
# GPU call (~3 min, run with carry .gpu): the score scale folded into exp2's multiply-add
# (_Scores.exponent / to_log2; the forward takes row maxima on unscaled scores, as tokamax's
# kernel does), against gpu_run62/64/67: causal at the shapes with cuDNN, softcap 50.
# Output: $OUT/*.log, *.json
set -u
source scripts/gpu_env.sh
bench fma_causal --shapes 2x2048,1x8192,1x32768 --impls mosaic,cudnn
bench fma_softcap50 --shapes 2x2048,1x8192,1x32768 --softcap 50 --impls mosaic
