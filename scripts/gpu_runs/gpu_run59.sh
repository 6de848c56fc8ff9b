#!/usr/bin/env bash
# GPU call (~2 min, run with carry .gpu): gpu_run58.sh's end-to-end part again (it had run
# without the gguf wheel on PYTHONPATH, so `import lorax` failed there): Llama-3.1-8B QLoRA at
# 1x8192, every row packed (examples of mean length 1024), the model's default attention for
# packed rows (Mosaic on Hopper) against the Triton kernels. Output: $OUT/bench_train_packed.*
set -u
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD PYTHONUNBUFFERED=1
timeout 420 python3 scripts/bench_train.py --cases "1x8192@selective:12,mlp@auto" \
  "1x8192@selective:12,mlp@pallas" --embeddings-on-host --packed 1024 --steps 8 --warmup 3 \
  --json $OUT/bench_train_packed.json 2>&1 | grep -v "^W0000\|^I0000\|UserWarning\|warnings.warn" \
  | tee $OUT/bench_train_packed.log
