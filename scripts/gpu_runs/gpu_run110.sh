#!/usr/bin/env bash
# GPU call (~8 min, carry .gpu; 2026-12-01, thirteenth session): the new families (Qwen 3,
# Gemma 2, Gemma 3 text) at their real layer widths, two layers each, 1x8192: float32 parity
# with transformers on the GPU, the bf16 default kernels against it, and the QLoRA loss and
# gradients of the default GPU path against the jnp references, unpacked and packed, with the
# step time of each (commit d4ace68). Output: $OUT/families.log.
set -u
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
python3 -c "import jax, transformers, torch; print(jax.__version__, transformers.__version__, torch.__version__)"
timeout 560 python3 scripts/check_families_gpu.py --seq-len 8192 2>&1 | q | grep -v "Writing model" \
  | tee $OUT/families.log
