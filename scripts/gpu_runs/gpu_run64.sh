#!/usr/bin/env bash
# GPU call (~8 min, run with carry .gpu): the softcap on tanh.approx (bench_attention --softcap
# 50 against gpu_run62's exact tanh from exp2), the window of 4096 again (gpu_run62's log of it
# did not come back), then Llama-3.1-8B QLoRA with a 4096 sliding window and packed rows
# (scripts/gpu_runs/gpu_run63.sh). At most 8 files come back. Output: $OUT/*.log, *.json
set -u
source scripts/gpu_env.sh
bench softcap50_approx --shapes 2x2048,1x8192,1x32768 --softcap 50 --impls mosaic,pallas,cudnn
bench window4096 --shapes 1x8192,1x32768 --window 4096 --impls mosaic,cudnn
bash scripts/gpu_runs/gpu_run63.sh
