#!/usr/bin/env bash
# Issue 4 (~8 min). Call 1 timed decode-sized M call by call, which measured the host's dispatch
# (~40 µs a call), not the device. (A, B) the same rows as per-layer device time: a lax.scan
# over distinct weights (200 MB of NF4, 4x the L2), as the model runs its layers.
# (C) end to end at short sequences (M = 1024, 2048), where call 1 had the Mosaic kernel on
# prepared weights 1.05-1.47x XLA's decode + cuBLAS on three of four shapes. 7 files back.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:${PYTHONPATH:-}
quiet() { grep -v "^W0000\|^I0000\|host_offloader"; }
timeout 170 python3 scripts/bench_nf4_matmul.py --ms 1,64,256 --modes fwd --no-extras \
  --scan-mb 200 --variants bf16_dot,reference,fused,dequant,mosaic,mosaic+prep --reps 5 \
  --budget-s 150 --json $OUT/scan_fwd.json 2>&1 | quiet > $OUT/scan.log
tail -2 $OUT/scan.log
timeout 100 python3 scripts/bench_nf4_matmul.py --ms 256,1024 --modes fwd+bwd --no-extras \
  --scan-mb 200 --variants bf16_dot,reference,fused,mosaic --reps 5 --budget-s 80 \
  --json $OUT/scan_fwd_bwd.json 2>&1 | quiet >> $OUT/scan.log
tail -2 $OUT/scan.log
: > $OUT/bench.log
bench() {  # TIMEOUT JSON ARGS...
  t=$1; j=$2; shift 2
  timeout $t python3 scripts/bench_train.py --steps 8 --warmup 3 --json $OUT/$j "$@" 2>&1 \
    | grep -v "^jax" | quiet | tee -a $OUT/bench.log | tail -2
}
ATTN=q_proj+k_proj+v_proj,o_proj
bench 55 xla_2k.json --cases "1x2048@none@auto"
bench 60 all_2k.json --prepare-kernel-weights --cases "1x2048@none@auto"
bench 60 attn_2k.json --prepare-kernel-weights $ATTN --cases "1x2048@none@auto"
bench 55 xla_1k.json --cases "1x1024@none@auto"
bench 60 all_1k.json --prepare-kernel-weights --cases "1x1024@none@auto"
