#!/usr/bin/env bash
# GPU call (~6 min, carry .gpu; 2026-12-01, thirteenth session). gpu_run110 found Gemma 3's
# float32 logits 25% (rel. L2) from transformers' on the GPU, for lorax's jnp references and
# its kernels alike, where Gemma 2 agreed to 2.9e-5 and the CPU tests (and a CPU run at
# Gemma-3-4B's widths, 1x8192) agree to 1e-5: which side moves between CPU and GPU
# (scripts/probe_family_devices.py). Then Qwen 3, whose reference step ran out of memory at
# 1x8192 in gpu_run110, at 1x4096. Output: $OUT/probe_*.log, $OUT/qwen3.log.
set -u
source scripts/gpu_env.sh
timeout 150 python3 scripts/probe_family_devices.py --family gemma3 --seq-len 2048 2>&1 | q \
  | grep -v "Writing model" | tee $OUT/probe_2k.log
timeout 200 python3 scripts/probe_family_devices.py --family gemma3 --seq-len 8192 2>&1 | q \
  | grep -v "Writing model" | tee $OUT/probe_8k.log
timeout 200 python3 scripts/check_families_gpu.py --families qwen3 --seq-len 4096 2>&1 | q \
  | grep -v "Writing model" | tee $OUT/qwen3.log
