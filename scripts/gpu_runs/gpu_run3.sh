#!/usr/bin/env bash
# Session 2026-11-29 call 1: profile the step, try the "mlp" remat policy and schedules,
# and find what sets the peak of the offload policy.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
P=scripts/profile_train.py
python3 $P --case 2x2048:selective --json $OUT/prof_2k_selective.json --hlo $OUT/hlo_2k_selective.txt 2>&1 | tail -62 | tee $OUT/prof_2k_selective.md
python3 $P --case 2x2048:mlp --json $OUT/prof_2k_mlp.json 2>&1 | tail -62 | tee $OUT/prof_2k_mlp.md
echo "elapsed $(( $(date +%s) - T0 ))s"
timeout 300 python3 scripts/bench_train.py --steps 8 --warmup 3 --json $OUT/train3.json \
  --cases 2x2048@mlp@auto 1x8192@mlp:16,selective@auto 1x8192@mlp:12,selective@auto 2>&1 | tee $OUT/train3.log
echo "elapsed $(( $(date +%s) - T0 ))s"
mkdir -p /tmp/dump
XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*lambda.*" \
  python3 $P --case 2x2048:offload --compile-only 2>&1 | tail -3 | tee $OUT/offload_memory.txt
ls -la /tmp/dump | head -20 > $OUT/dump_listing.txt
for f in /tmp/dump/*buffer-assignment.txt; do
  grep -n -i -A120 "peak buffers\|stats:" "$f" | head -400 > $OUT/offload_peak_buffers.txt
  head -c 300000 "$f" > $OUT/offload_buffer_assignment_head.txt
done
echo "elapsed $(( $(date +%s) - T0 ))s"
timeout 120 python3 scripts/bench_train.py --steps 8 --warmup 3 --chunk 256 --json $OUT/train3_lowmem.json \
  --cases 2x2048@offload@auto 2>&1 | tee -a $OUT/train3.log
echo "elapsed $(( $(date +%s) - T0 ))s"
