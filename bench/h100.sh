#!/usr/bin/env bash
# All GPU benchmarks for one lent H100 session, in two parts that each fit one 10-minute device
# call (the device tool's limit), kernels first:
#   bash bench/h100.sh kernels   # matmul, grouped matmul, attention, MLA decode   (~8 min)
#   bash bench/h100.sh model     # decode tokens/s vs transformers, train MFU        (~9 min)
# Each bench appends its table to bench/RESULTS.md (date, device, jax version, command); with
# $OUT set (the device tool), RESULTS.md and one log per bench are copied there as well.
# Every bench has an "err" column: check it before trusting a number (the Mosaic GPU kernels
# have been verified in interpret mode and by lowering only).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
part="${1:-kernels}"
out="${OUT:-bench/logs}"
mkdir -p "$out"
status=0

run() {  # run NAME SECONDS ARGS...: one bench, its own time limit, its log kept
  local name=$1 limit=$2
  shift 2
  echo "== $name: python $*"
  timeout "$limit" python "$@" --markdown bench/RESULTS.md 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!! $name exited $rc"; status=1; }
}

python -c "import jax; print(jax.__version__, jax.devices())"
case "$part" in
  kernels)
    run matmul 150 bench/matmul.py --quick
    run grouped_matmul 150 bench/grouped_matmul.py --quick --grad
    run attention 150 bench/attention.py --quick
    run mla_decode 100 bench/mla_decode.py --quick
    ;;
  model)
    run decode 300 bench/decode.py --batches 1,8,64 --backend auto
    run train 270 bench/train.py --case-timeout 120
    ;;
  *)
    echo "usage: bash bench/h100.sh kernels|model" >&2
    exit 2
    ;;
esac
[ "$out" = "bench/logs" ] || cp bench/RESULTS.md "$out/RESULTS.md"
exit $status
