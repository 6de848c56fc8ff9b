#!/usr/bin/env bash
# Session 2026-11-29 call 2: kernel-level profiles (command buffers off so every kernel is
# attributed to its HLO op) and the low-memory variants.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
P=scripts/profile_train.py
export XLA_FLAGS="--xla_gpu_enable_command_buffer="
python3 $P --case 2x2048:mlp --top 60 --json $OUT/prof_2k_mlp.json 2>&1 | grep -v Deprecation | tail -85 > $OUT/profiles.md
python3 $P --case 1x8192:mlp:16,selective --top 60 --json $OUT/prof_8k_mlp16.json 2>&1 | grep -v Deprecation | tail -85 >> $OUT/profiles.md
unset XLA_FLAGS
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
B="python3 scripts/bench_train.py --steps 8 --warmup 3"
timeout 100 $B --chunk 128 --cases 2x2048@offload@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 100 $B --chunk 128 --forward mlp_chunk_tokens=2048 --cases 2x2048@offload@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 100 $B --chunk 128 --cases 1x8192@offload@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 100 $B --forward matmul_impl=reference --cases 2x2048@mlp@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
