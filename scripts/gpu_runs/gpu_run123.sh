#!/usr/bin/env bash
# GPU call (~9.5 min, carry .gpu; 2026-12-01, sixteenth session): what run 122's timeouts cut,
# now with every value streamed as it is measured. (1) Qwen3-30B-A3B's MoE layer fwd+bwd alone
# (--layer-only) at 8192 tokens, LoRA "dense" / "chunked" / none with lorax's tiles, each step
# repeated to check that it is bitwise deterministic; (2) its two full-width layers against
# transformers (check_families_gpu.py, 1x2048); (3) Mixtral-8x7B's layer, "dense" vs "chunked".
set -u
source scripts/gpu_env.sh
timeout 230 python3 scripts/bench_moe.py --model qwen3 --tokens 8192 --impls mosaic --layer-only \
  --child-timeout 200 --json $OUT/bench_moe_qwen3.json 2>&1 | q | tee $OUT/bench_moe_qwen3.log
timeout 215 python3 scripts/check_families_gpu.py --families qwen3-moe --seq-len 2048 \
  --child-timeout 200 2>&1 | q | grep -v "Writing model" | tee $OUT/qwen3_moe_layer.log
timeout 130 python3 scripts/bench_moe.py --model mixtral --tokens 8192 --impls mosaic --layer-only \
  --child-timeout 110 --json $OUT/bench_moe_mixtral.json 2>&1 | q | tee $OUT/bench_moe_mixtral.log
