#!/usr/bin/env bash
# GPU call (~5 min, run with carry .gpu and .gpu_tokamax): tokamax's Mosaic GPU flash attention
# (tokamax 0.0.17 and its dependencies, carried as wheels in .gpu_tokamax/ and installed here
# into a directory of their own) against lorax's Mosaic kernels and cuDNN: causal GQA at the
# issue's three shapes, then softcap 50 and a 1024 window at 1x8192 (tokamax takes both).
# Output: $OUT/*.log, *.json
set -u
pip install -q --no-deps --target /tmp/tokamax .gpu_tokamax/*.whl 2>&1 | tail -2
PYTHONPATH_EXTRA=/tmp/tokamax source scripts/gpu_env.sh
python3 -c "import tokamax; print('tokamax', tokamax.__version__)" 2>&1 | tail -1
BENCH_TIMEOUT=170 BENCH_BUDGET=140
bench tokamax_causal --shapes 2x2048,1x8192,1x32768 --impls mosaic,tokamax,cudnn
bench tokamax_softcap --shapes 1x8192 --softcap 50 --impls mosaic,tokamax,pallas
bench tokamax_window --shapes 1x8192 --window 1024 --impls mosaic,tokamax,cudnn
