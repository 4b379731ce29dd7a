#!/usr/bin/env bash
# Run the fault and recovery tests N times in a row (default 20) while a CPU load generator keeps
# every core busy; stop at the first failure. Each run gets its own FAULT_SEED, so the workers die
# at other moments of their iterations (tests/test_faults.py). Prints one line per run and a
# summary; exit status 0 only when every run passed.
#
#   bash scripts/soak-faults.sh            # 20 runs of tests/test_faults.py
#   N=5 TESTS="tests/test_faults.py tests/test_checkpoint.py" bash scripts/soak-faults.sh
set -uo pipefail
cd "$(dirname "$0")/.."
N=${N:-20}
TESTS=${TESTS:-tests/test_faults.py}
PY=${PY:-.venv/bin/python}
cores=$(nproc)

load=()
for _ in $(seq "$cores"); do
  "$PY" -c "while True: pass" &
  load+=($!)
done
trap 'kill "${load[@]}" 2>/dev/null' EXIT
echo "soak: $N runs of $TESTS beside $cores busy-loop processes ($(uname -n), $(date -u +%FT%TZ))"

passed=0
for i in $(seq "$N"); do
  t0=$(date +%s)
  if FAULT_SEED=$i PYTHONNODEBUGRANGES=1 "$PY" -m pytest -q -p no:randomly $TESTS > "/tmp/soak-faults-$i.log" 2>&1; then
    passed=$((passed + 1))
    echo "run $i: passed in $(( $(date +%s) - t0 )) s, load average $(cut -d' ' -f1 /proc/loadavg)"
  else
    echo "run $i: FAILED in $(( $(date +%s) - t0 )) s; log: /tmp/soak-faults-$i.log"
    tail -n 30 "/tmp/soak-faults-$i.log"
    break
  fi
done
echo "soak: $passed of $N runs passed in a row"
[ "$passed" = "$N" ]
