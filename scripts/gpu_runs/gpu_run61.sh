#!/usr/bin/env bash
# GPU call (~5 min, run with carry .gpu): the Mosaic attention kernels skipping the tiles that lie
# across segments (segment_spans). bench_attention --segments 1024 (Mosaic vs Triton, cuDNN
# unsegmented as the anchor), then Llama-3.1-8B QLoRA with packed rows (mean example 1024) at
# 1x8192 and 2x2048 with the default attention (Mosaic). Output: $OUT/*.log, *.json
set -u
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD PYTHONUNBUFFERED=1
q() { grep -v "^W0000\|^I0000\|UserWarning\|warnings.warn"; }
timeout 240 python3 scripts/bench_attention.py --shapes 2x2048,1x8192,1x32768 \
  --impls mosaic,pallas,cudnn --segments 1024 --budget-s 200 \
  --json $OUT/bench_attention_skip.json 2>&1 | q | tee $OUT/bench_attention_skip.log
timeout 300 python3 scripts/bench_train.py --cases "1x8192@selective:12,mlp@auto" \
  --embeddings-on-host --packed 1024 --steps 8 --warmup 3 \
  --json $OUT/bench_train_skip_8k.json 2>&1 | q | tee $OUT/bench_train_skip_8k.log
timeout 200 python3 scripts/bench_train.py --cases "2x2048@mlp@auto" --packed 1024 --steps 8 \
  --warmup 3 --json $OUT/bench_train_skip_2k.json 2>&1 | q | tee $OUT/bench_train_skip_2k.log
