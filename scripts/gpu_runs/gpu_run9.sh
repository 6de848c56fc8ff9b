#!/usr/bin/env bash
# Session 2026-11-29 (3rd) call 2: final lorax rows with the embedding table in host memory,
# more `mlp` layers at 8K in the freed gigabyte, and Unsloth in the same session.
set -u
export PYTHONPATH=$PWD/.gpu:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
B="python3 scripts/bench_train.py --steps 8 --warmup 3 --embeddings-on-host"
timeout 80 $B --cases "1x8192@mlp:19,selective@auto" --json $OUT/lorax_8k_19.json 2>&1 | grep -v "^jax" | tee $OUT/bench.log
timeout 80 $B --chunk 128 --cases "1x8192@mlp:20,selective@auto" --json $OUT/lorax_8k_20.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 70 $B --chunk 128 --cases 2x2048@offload@auto --json $OUT/lowmem_2k.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
timeout 80 $B --chunk 128 --forward mlp_chunk_tokens=4096 --cases 1x8192@offload@auto --json $OUT/lowmem_8k.json 2>&1 | grep -v "^jax" | tee -a $OUT/bench.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
export PYTHONPATH=$PWD/.site:$PYTHONPATH
LEFT=$(( 585 - $(date +%s) + T0 ))
timeout $LEFT python3 scripts/bench_torch.py --systems unsloth --deadline-s $(( LEFT - 10 )) --json $OUT/torch.json > $OUT/torch.log 2>&1
tail -8 $OUT/torch.log
echo "elapsed $(( $(date +%s) - T0 ))s" | tee -a $OUT/bench.log
