#!/usr/bin/env bash
# GPU call (~6 min): the fused dK/dV/dQ backward (MgpuAttentionConfig(fused_dq=True): five tile
# products, dQ partials reduce-added by TMA) against the default two-kernel backward and cuDNN,
# at all three shapes of issue 5. Fused variants run in their own process under timeout (a
# deadlocked kernel costs at most 200 s and stops the rest).
# Ran at commit 849b3be; the fused design was removed afterwards (slower at every shape, BENCHMARKS §3).
# Output: $OUT/check_mgpu_attention.log.
set -u
export PYTHONPATH=$PWD/scripts:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
LOG=$OUT/check_mgpu_attention.log
: > $LOG
quiet() { grep -v "^W0000\|^I0000\|UserWarning\|warnings.warn" | tee -a $LOG; }
git log -1 --format='commit %h %s' 2>/dev/null | tee -a $LOG
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv | tee -a $LOG
for shape in 1x8192 2x2048 1x32768; do
  timeout 200 python3 scripts/check_mgpu_attention.py --shapes $shape --no-cudnn \
    --variants "fused,fused r240" 2>&1 | quiet
  rc=${PIPESTATUS[0]}
  timeout 150 python3 scripts/check_mgpu_attention.py --shapes $shape --variants default 2>&1 | quiet
  if [ $rc -ne 0 ]; then echo "fused variants at $shape: exit $rc, stopping" | tee -a $LOG; break; fi
done
