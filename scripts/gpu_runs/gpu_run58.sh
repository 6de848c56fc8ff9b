#!/usr/bin/env bash
# GPU call (~8 min): packed rows (segment ids) on the Mosaic GPU attention kernels.
# 1. bench_attention --segments 1024: Mosaic vs the Triton kernels (both masking segments,
#    outputs and gradients compared) and cuDNN unsegmented as the anchor, at 2x2048, 1x8192,
#    1x32768.
# 2. bench_train --packed 1024 at 1x8192 (Llama-3.1-8B QLoRA, selective:12,mlp, embeddings on
#    host): the model's default for packed rows (now the Mosaic kernels on Hopper) against the
#    Triton kernels it used before.
# Output: $OUT/bench_attention_segments.{log,json}, $OUT/bench_train_packed.{log,json}.
# (Its bench_train part failed: no .gpu carried, so the gguf import failed; gpu_run59.sh reran it.)
set -u
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
quiet() { grep -v "^W0000\|^I0000\|UserWarning\|warnings.warn"; }
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv
timeout 270 python3 scripts/bench_attention.py --shapes 2x2048,1x8192,1x32768 \
  --impls mosaic,pallas,cudnn --segments 1024 --budget-s 230 \
  --json $OUT/bench_attention_segments.json 2>&1 | quiet | tee $OUT/bench_attention_segments.log
timeout 300 python3 scripts/bench_train.py --cases "1x8192@selective:12,mlp@auto" \
  "1x8192@selective:12,mlp@pallas" --embeddings-on-host --packed 1024 --steps 8 --warmup 3 \
  --json $OUT/bench_train_packed.json 2>&1 | quiet | tee $OUT/bench_train_packed.log
