#!/usr/bin/env bash
# GPU call (~5 min): the Mosaic attention backward with tensor-core turn-taking (bwd_turns)
# against the default and cuDNN, at all three shapes. The turn-taking variants run in their
# own processes under timeout: a deadlocked kernel costs at most 150 s and stops the rest.
# Ran at commit adbd9fa; the turn-taking variants were removed afterwards (slower everywhere).
# Output: $OUT/check_mgpu_attention.log.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
LOG=$OUT/check_mgpu_attention.log
: > $LOG
quiet() { grep -v "^W0000\|^I0000\|UserWarning\|warnings.warn" | tee -a $LOG; }
for shape in 1x8192 2x2048 1x32768; do
  timeout 120 python3 scripts/check_mgpu_attention.py --shapes $shape --variants default 2>&1 | quiet
  variants="turns"
  [ $shape = 1x8192 ] && variants="turns,turns dq kv64,turns 3 slots"
  timeout 150 python3 scripts/check_mgpu_attention.py --shapes $shape --no-cudnn \
    --variants "$variants" 2>&1 | quiet
  rc=${PIPESTATUS[0]}
  if [ $rc -ne 0 ]; then echo "turn variants at $shape: exit $rc, stopping" | tee -a $LOG; break; fi
done
