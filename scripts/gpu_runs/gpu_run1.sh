#!/usr/bin/env bash
# One device call: environment, end-to-end train bench, kernel benches. Outputs under $OUT.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 -c "import jax; print(jax.__version__, jax.devices())"
git log -1 --format=%H 2>/dev/null
timeout 330 python3 scripts/bench_train.py --shapes 2x2048 --remat full,none,offload --steps 8 --warmup 2 --json $OUT/train.json 2>&1 | tee $OUT/train.log
timeout 130 python3 scripts/bench_nf4_matmul.py --quick --budget-s 100 --json $OUT/nf4.json 2>&1 | tee $OUT/nf4.log
timeout 120 python3 scripts/bench_attention.py --shapes 2x2048,1x8192 --budget-s 90 --json $OUT/attn.json 2>&1 | tee $OUT/attn.log
