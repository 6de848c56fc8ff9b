#!/usr/bin/env bash
# GPU call (~4 min, carry .gpu): why the QLoRA step at 1x8192 ran 5% slower with the Mosaic
# attention (11,906 tok/s) than with cuDNN's (12,536; gpu_run80) although the kernels alone run
# 3% faster fwd+bwd (gpu_run79). Both steps profiled kernel by kernel (command buffers off).
# Output: $OUT/profile_8k_{cudnn,mosaic}.md.
set -u
source scripts/gpu_env.sh
for attn in cudnn mosaic; do
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 200 python3 scripts/profile_train.py \
    --case "1x8192:selective:12,mlp" --embeddings-on-host --steps 3 --warmup 2 --top 80 \
    --forward attention_impl=$attn > $OUT/profile_8k_$attn.md 2>&1
  grep -v "^W1\|^I1\|host_offloader" $OUT/profile_8k_$attn.md | head -30
done
