#!/usr/bin/env bash
# GPU call on 2 H200s (nvidia-h200-x2, ~6 min, run with carry .gpu): gpu_run65 again, after the
# steps fill in the mesh's forward constraints (make_train_step with shardings;
# check_sharding_gpu's step had none, so it left the kernels to the partitioner in run 65).
# Output: $OUT/*.log
set -u
bash scripts/gpu_runs/gpu_run65.sh
