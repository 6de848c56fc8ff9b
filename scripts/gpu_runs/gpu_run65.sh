#!/usr/bin/env bash
# GPU call on 2 H200s (nvidia-h200-x2, ~6 min, run with carry .gpu): the attention kernels with
# the batch split over a data=1 x fsdp=2 mesh. check_attention_mesh_gpu: packed 1x8192 rows
# per GPU, each kernel run per device (shard_map, what the model does) against left to XLA's
# partitioner: collectives, time, error against one device. Then check_sharding_gpu: a
# Llama-3.1-8B QLoRA step on the mesh with packed rows (1x8192 per GPU), the model's default
# attention (now Mosaic, per device) against the Triton kernels, 6 timed steps each.
# Output: $OUT/*.log
set -u
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpus.log
timeout 200 python3 scripts/check_attention_mesh_gpu.py --impls mosaic,pallas --seq 8192 \
  --packed 1024 2>&1 | q | tee $OUT/check_attention_mesh.log
timeout 360 python3 scripts/check_sharding_gpu.py --batch 2 --seq 8192 --remat selective \
  --packed 1024 --attention auto,pallas --steps 6 2>&1 | q | tee $OUT/check_sharding_packed.log
