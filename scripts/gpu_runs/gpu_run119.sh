#!/usr/bin/env bash
# GPU call (~9 min, carry .gpu; 2026-12-01, fifteenth session): Qwen 3 MoE, second call. Run
# 118 printed only its ceilings: each bench_moe.py child printed its rows at its end and was
# cut by the call's timeouts first (the children now stream their rows), as was the layer check.
# (1) bench_moe.py at Qwen3-30B-A3B's expert shapes, 8192 tokens, the default Mosaic tiles only:
# the grouped matmuls, then one MoE layer fwd+bwd with LoRA products "dense" vs "chunked" vs no
# LoRA; (2) a whole QLoRA training step of Qwen3-30B-A3B (scripts/bench_train.py, random NF4
# weights, r=16 on every projection and expert, 48 layers), 2x2048.
set -u
source scripts/gpu_env.sh
timeout 230 python3 scripts/bench_moe.py --model qwen3 --tokens 8192 --impls mosaic --layer \
  --no-sweep --child-timeout 200 --json $OUT/bench_moe_qwen3.json 2>&1 | q | tee $OUT/bench_moe_qwen3.log
timeout 300 python3 scripts/bench_train.py --model qwen3-30b-a3b --cases 2x2048@mlp@auto \
  --json $OUT/train_qwen3.json 2>&1 | q | tee $OUT/train_qwen3.log
