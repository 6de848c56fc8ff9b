#!/usr/bin/env bash
# GPU call (~7 min, carry .gpu; 2026-12-01, eleventh session): the fused backward with dS as a
# bfloat16 product (commit ade4a16) at the shorter shapes, where check_mgpu_attention.py also
# prints the errors against float32: 1x8192 and 2x2048 beside the default and cuDNN, 1x8192
# against the tree before (.gpu/old_tree, efe27c3), and 1x8192 with a window, a softcap and
# packed segments (the options' masks and softcap derivative on the GPU).
# Output: $OUT/{new_8k,new_2k,old_8k,opts_8k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
old() { env PYTHONPATH=$PWD/.gpu/old_tree:$PYTHONPATH "$@"; }
logged new_8k timeout 120 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "fused,default"
logged old_8k old timeout 80 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --no-cudnn --variants "fused"
logged new_2k timeout 100 python3 scripts/check_mgpu_attention.py --shapes 2x2048 \
  --variants "fused,default"
logged opts_8k timeout 120 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --window 4096 --softcap 50 --segments 3000 --variants "fused,default"
cat $OUT/summary.txt
