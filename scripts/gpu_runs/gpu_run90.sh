#!/usr/bin/env bash
# Ran at 51afce4 (2026-11-30, eighth session): every fused variant hung until its timeout
# (registers beyond the launch budget, see gpu_run91.sh); the default's lines are in
# scripts/results/h200-2026-11-30-s8/run90/.
# GPU call (~8 min, carry .gpu; 2026-11-30, eighth session): the backward with dQ fused into the
# dK/dV kernel by splitting the warpgroups' roles (MgpuAttentionConfig.bwd_dq, _fused_call):
# warpgroup 0 computes P and dV over the CTA's 128 keys, warpgroup 1 dS, dK and the dQ
# partials, reduce-added into float32 by TMA ("fused tma") or by red.global.add ("fused
# atomic"). Offline SASS (1x32768): no wgmma fences, hot loops of 441 instructions (24 wgmmas,
# no spills) and ~650 (32 wgmmas, 0-2 local loads). Each shape in its own process under
# timeout (a hang is a timeout, not a lost call): correctness against float32 at 2x2048 and
# 1x8192, timings against the two-kernel default and cuDNN at all three shapes.
# Output: $OUT/fused_{2k,32k,8k}.log, $OUT/summary.txt.
set -u
source scripts/gpu_env.sh
variants="default,fused tma,fused atomic,fused tma r240"
logged fused_2k timeout 150 python3 scripts/check_mgpu_attention.py --shapes 2x2048 \
  --variants "$variants"
logged fused_32k timeout 200 python3 scripts/check_mgpu_attention.py --shapes 1x32768 \
  --variants "$variants"
logged fused_8k timeout 200 python3 scripts/check_mgpu_attention.py --shapes 1x8192 \
  --variants "$variants"
