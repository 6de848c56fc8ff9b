#!/usr/bin/env bash
# Session 2026-11-29 call 4: final lorax rows (XLA decode by default, cuDNN residuals kept once),
# Unsloth in the same session (speed, then max context), and the single-GPU sharding check.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
git log -1 --format=%H 2>/dev/null | tee $OUT/bench.log
JAX_PLATFORMS=cuda timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_flash_attention.py -k cudnn_forward_residuals 2>&1 | tail -2 | tee -a $OUT/bench.log
B="python3 scripts/bench_train.py --steps 8 --warmup 3"
timeout 60 $B --json $OUT/lorax_2k.json --cases 2x2048@mlp@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 70 $B --json $OUT/lorax_8k.json --cases 1x8192@mlp:16,selective@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 60 $B --json $OUT/lorax_lowmem_2k.json --chunk 64 --forward mlp_chunk_tokens=2048 --cases 2x2048@offload@auto 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
if [ -f scripts/check_sharding_gpu.py ]; then
  timeout 60 python3 scripts/check_sharding_gpu.py 2>&1 | tail -25 > $OUT/sharding_check.log
fi
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
export PYTHONPATH=$PWD/.site:$PYTHONPATH
timeout 230 python3 scripts/bench_torch.py --systems unsloth --deadline-s 220 --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -8 $OUT/torch.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
LEFT=$(( 575 - $(date +%s) + T0 ))
timeout $LEFT python3 scripts/bench_torch.py --max-context --systems unsloth --deadline-s $(( LEFT - 10 )) --json $OUT/torch_maxctx.json > $OUT/torch_maxctx.log 2>&1
tail -14 $OUT/torch_maxctx.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
