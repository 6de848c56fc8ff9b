#!/usr/bin/env bash
# GPU call on 2 H200s (nvidia-h200-x2, ~4 min, run with carry .gpu): Llama-3.1-8B QLoRA steps on
# the 2-GPU mesh beyond gpu_run66: unpacked rows (the default attention there is cuDNN, whose
# partitioning is jax's own), and packed rows on a data=2 x fsdp=1 mesh (data parallel: the
# base replicated, the Mosaic kernels per device). 6 timed steps each. Output: $OUT/*.log
set -u
source scripts/gpu_env.sh
timeout 270 python3 scripts/check_sharding_gpu.py --batch 2 --seq 8192 --remat selective \
  --attention auto --steps 6 2>&1 | q | tail -40 | tee $OUT/check_sharding_unpacked.log
timeout 270 python3 scripts/check_sharding_gpu.py --mesh data=2,fsdp=1 --batch 2 --seq 8192 \
  --remat selective --packed 1024 --attention auto --steps 6 2>&1 | q | tail -40 \
  | tee $OUT/check_sharding_data_parallel.log
