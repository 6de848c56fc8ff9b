#!/usr/bin/env bash
# GPU call (~7 min, carry .gpu): the attention table with the "auto" launch order (gpu_run76-78:
# tiles first below 99 CTAs per head, heads first from there), with the options the model
# uses: causal against cuDNN at 2x2048 / 1x8192 / 1x32768, then packed rows (1024-token
# examples), a 4096 window (with cuDNN) and softcap 50 at 1x8192.
# Output: $OUT/{causal,segments,window4096,softcap50}.{log,json}.
# The same commands as gpu_run74.sh (the table before the launch-order change).
exec bash scripts/gpu_runs/gpu_run74.sh
