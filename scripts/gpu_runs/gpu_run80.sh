#!/usr/bin/env bash
# GPU call (~5 min, carry .gpu): does the Mosaic attention's new launch order move the QLoRA
# step? gpu_run79 measured its causal fwd+bwd at 1.23x / 1.03x cuDNN's at 2x2048 / 1x8192.
# Here BENCHMARKS §1's speed rows (Llama-3.1-8B, unpacked) with cuDNN (the default, "auto") and
# with the Mosaic kernels forced, in one call. Output: $OUT/bench.log and one JSON per case.
set -u
source scripts/gpu_env.sh
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -3; }
train() {  # TIMEOUT JSON ARGS...
  t=$1; j=$2; shift 2
  timeout $t python3 scripts/bench_train.py --steps 8 --warmup 3 --json $OUT/$j "$@" 2>&1 | quiet
}
for attn in auto mosaic; do
  train 70 2k_$attn.json --cases "2x2048@mlp@$attn"
  train 80 8k_$attn.json --embeddings-on-host --cases "1x8192@selective:12,mlp@$attn"
done
