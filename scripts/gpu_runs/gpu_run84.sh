#!/usr/bin/env bash
# GPU call (~8 min, carry .gpu; run 2026-11-30, seventh session): the train step's new default compiler option
# (xla_gpu_enable_dynamic_slice_fusion=False, lorax.train.step.DEFAULT_COMPILER_OPTIONS).
# gpu_run82/83 found XLA's dynamic-slice fusion cloning the Mosaic attention forward (run twice
# per layer); with the option off by XLA_FLAGS the Mosaic 1x8192 step ran 11,906 -> 12,489
# tok/s. Here, through the step's own options: the forward count in the compiled HLO (expect 1),
# then the 1x8192 step with cuDNN, Mosaic and packed rows (the trainer's default: Mosaic), each
# with the default and with XLA's own options (--compiler-options none), in one call.
# Output: $OUT/recompute.log, $OUT/bench.log and one JSON per case.
set -u
source scripts/gpu_env.sh
timeout 100 python3 scripts/probe_attention_recompute.py --attention mosaic 2>&1 | q \
  | tee $OUT/recompute.log
: > $OUT/bench.log
train() {  # JSON ARGS...
  j=$1; shift
  timeout 80 python3 scripts/bench_train.py --steps 6 --warmup 2 --embeddings-on-host \
    --json $OUT/$j "$@" 2>&1 | grep -v "^jax\|^W0000\|^I0000\|host_offloader" \
    | tee -a $OUT/bench.log | tail -1
}
for xla in default none; do
  train 8k_cudnn_$xla.json --compiler-options $xla --cases "1x8192@selective:12,mlp@auto"
  train 8k_mosaic_$xla.json --compiler-options $xla --cases "1x8192@selective:12,mlp@mosaic"
  train 8k_packed_$xla.json --compiler-options $xla --packed 1024 \
    --cases "1x8192@selective:12,mlp@auto"
done
