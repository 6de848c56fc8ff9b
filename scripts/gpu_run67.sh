#!/usr/bin/env bash
# GPU call (~5 min, run with carry .gpu and .gpu_tokamax): tokamax's Mosaic GPU flash attention
# (tokamax 0.0.17 and its dependencies, carried as wheels in .gpu_tokamax/ and installed here
# into a directory of their own) against lorax's Mosaic kernels and cuDNN: causal GQA at the
# issue's three shapes, then softcap 50 and a 1024 window at 1x8192 (tokamax takes both).
# Output: $OUT/*.log, *.json
set -u
pip install -q --no-deps --target /tmp/tokamax .gpu_tokamax/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD:/tmp/tokamax PYTHONUNBUFFERED=1
q() { grep -v "^W0000\|^I0000\|UserWarning\|warnings.warn"; }
python3 -c "import tokamax; print('tokamax', tokamax.__version__)" 2>&1 | tail -1
bench() {  # name, then bench_attention arguments
  local name=$1; shift
  timeout 170 python3 scripts/bench_attention.py --budget-s 140 --json $OUT/$name.json "$@" \
    2>&1 | q | tee $OUT/$name.log
}
bench tokamax_causal --shapes 2x2048,1x8192,1x32768 --impls mosaic,tokamax,cudnn
bench tokamax_softcap --shapes 1x8192 --softcap 50 --impls mosaic,tokamax,pallas
bench tokamax_window --shapes 1x8192 --window 1024 --impls mosaic,tokamax,cudnn
