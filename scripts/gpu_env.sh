# Sourced by the scripts/gpu_runs/gpu_run*.sh device calls: the import path (the carried gguf wheel in
# .gpu, scripts/ and the repository), q (drops XLA's log noise from a pipe) and bench (one
# bench_attention.py run: a name for its log and JSON under $OUT, then its arguments).
# PYTHONPATH_EXTRA is appended to the path; BENCH_TIMEOUT and BENCH_BUDGET (seconds) override
# bench's process timeout and its --budget-s.
export PYTHONPATH=$PWD/.gpu:$PWD/scripts:$PWD${PYTHONPATH_EXTRA:+:$PYTHONPATH_EXTRA} PYTHONUNBUFFERED=1
q() { grep -v "^W0000\|^I0000\|UserWarning\|warnings.warn"; }
bench() {
  local name=$1; shift
  timeout ${BENCH_TIMEOUT:-150} python3 scripts/bench_attention.py --budget-s ${BENCH_BUDGET:-120} \
    --json $OUT/$name.json "$@" 2>&1 | q | tee $OUT/$name.log
}
# logged NAME CMD...: CMD's output (XLA's noise dropped) into $OUT/NAME.log, and its table,
# failure and ptxas spill lines (MOSAIC_GPU_DUMP_PTXAS=1) into $OUT/summary.txt under "== NAME".
logged() {
  local name=$1; shift
  "$@" 2>&1 | q > $OUT/$name.log
  echo "== $name" >> $OUT/summary.txt
  grep -E "^==|TFLOP|spill stores|FAILED|killed|%" $OUT/$name.log | grep -v "stack frame" | uniq \
    >> $OUT/summary.txt
}
