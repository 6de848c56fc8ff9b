#!/usr/bin/env bash
# Issue 4 (~8 min): the LoRA projection groups on the Mosaic GPU NF4 kernel with weights
# stacked once in its layout and the LoRA terms in its reduction (check_nf4_lora_group_mgpu:
# errors and timings against the default XLA path, M = 4096, 8192), then the end-to-end A/B
# of lorax.prepare_kernel_weights against the default at 2x2048 and 1x8192.
# Carry .gpu. 6 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv | tee $OUT/gpu.txt
timeout 230 python3 scripts/check_nf4_lora_group_mgpu.py --ms 4096,8192 2>&1 \
  | grep -v "^W0000\|^I0000" > $OUT/check_lora_group.log
echo "check exit $?"; grep -c "rel.L2" $OUT/check_lora_group.log; tail -3 $OUT/check_lora_group.log
: > $OUT/bench.log
quiet() { grep -v "^jax\|^W0000\|^I0000\|host_offloader" | tee -a $OUT/bench.log | tail -2; }
bench() {  # TIMEOUT JSON ARGS...
  t=$1; j=$2; shift 2
  timeout $t python3 scripts/bench_train.py --steps 8 --warmup 3 --json $OUT/$j "$@" 2>&1 | quiet
}
bench 50 xla_2k.json --cases "2x2048@mlp@auto"
bench 60 prepared_2k.json --prepare-kernel-weights --cases "2x2048@mlp@auto"
bench 60 xla_8k.json --embeddings-on-host --cases "1x8192@selective:12,mlp@auto"
bench 70 prepared_8k.json --embeddings-on-host --prepare-kernel-weights \
  --cases "1x8192@selective:12,mlp@auto"
