#!/usr/bin/env bash
# The one script a lent GPU machine runs (the `device` tool), from the repository root:
#
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
#
# The machine (one H200, Python 3.12 at python3 with CuPy for CUDA 13, torch, NumPy, SciPy,
# ...; no network) lacks dask, distributed, zarr, dask-cuda, Pty-Chi and a few of their
# needs: they travel as wheels in .whl/ (ignored by git; benchmarks/gpu-wheels.txt lists them, why, and the
# pip download command that fetches them into .whl/ on a machine with PyPI)
# and are installed into /tmp/site, which PYTHONPATH puts first.
#
# Steps, each under its own `timeout` (seconds from the environment), output tee'd into
# $OUT/gpu_log.txt; a failing or timed-out step is recorded in $OUT/gpu_steps.txt and the
# next one runs all the same:
#   tests  TESTS_S=150  pytest -m gpu tests (per-test --timeout TEST_TIMEOUT_S, at most TESTS_S-20)
#   bench  BENCH_S=240  python3 -m benchmarks gpu --out gpu $BENCH_ARGS   -> $OUT/gpu.json
#   peers  PEERS_S=120  Pty-Chi on CUDA vs daskptycho ml device=gpu       -> $OUT/peers_gpu.json
# STEPS="tests bench peers" chooses which run (in that order). TOTAL_S=540 caps the whole
# script: a step gets no more than what is left of it, and is skipped under 20 s.
# Files back in $OUT (at most 8): gpu_device.txt, gpu_log.txt, gpu_steps.txt, gpu_tests.xml,
# gpu.json, peers_gpu.json. Without $OUT (a run by hand) they go to benchmarks/results/device/.
set -u
cd "$(dirname "$0")/.." || exit 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
PIP_RC=$?
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1

T0=$SECONDS
TOTAL_S=${TOTAL_S:-540}
TESTS_S=${TESTS_S:-150}
BENCH_S=${BENCH_S:-240}
PEERS_S=${PEERS_S:-120}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-300}
STEPS=${STEPS:-tests bench peers}
BENCH_ARGS=${BENCH_ARGS:-}
PEERS_ARGS=${PEERS_ARGS:---scan 48 --slices 8 --iterations 10}
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
SUMMARY="$OUT/gpu_steps.txt"
: >"$LOG"
: >"$SUMMARY"
FAILED=0

echo "wheels: pip install into /tmp/site rc=$PIP_RC ($(ls .whl/*.whl 2>/dev/null | wc -l) wheels)" | tee -a "$SUMMARY" "$LOG"
[ "$PIP_RC" = 0 ] || FAILED=1

# --- the device and the versions
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  kernel: $(uname -r)  cpus: $(nproc)"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm --format=csv \
        || echo "nvidia-smi failed or is missing"
    timeout 90 python3 - <<'PY'
import importlib
import platform
import sys

print("python", platform.python_version(), sys.executable)
for name in ("numpy", "scipy", "cupy", "torch", "torchvision", "dask", "distributed", "zarr", "numcodecs", "xarray",
             "dask_cuda", "distributed_ucxx", "ptychi", "pydantic", "pyfftw", "numba", "h5py", "pandas"):
    try:
        m = importlib.import_module(name)
        where = getattr(m, "__file__", "") or ""
        print(f"{name} {getattr(m, '__version__', '?')}  ({where})")
    except Exception as e:  # noqa: BLE001 - each package on its own line
        print(f"{name}: NOT IMPORTABLE ({type(e).__name__}: {e})")
try:
    import cupy

    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    free, total = rt.memGetInfo()
    print("cupy: devices", rt.getDeviceCount(), "name", props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
          "runtime", rt.runtimeGetVersion(), "driver", rt.driverGetVersion(), f"free {free / 2**30:.1f} of {total / 2**30:.1f} GiB")
except Exception as e:  # noqa: BLE001
    print(f"cupy on the GPU: FAILED ({type(e).__name__}: {e})")
try:
    import torch

    print("torch: cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:  # noqa: BLE001
    print(f"torch on the GPU: FAILED ({type(e).__name__}: {e})")
PY
} >"$OUT/gpu_device.txt" 2>&1
cat "$OUT/gpu_device.txt" >>"$LOG"

# --- the steps
# step NAME LIMIT_S COMMAND...: runs COMMAND under timeout (capped by what is left of TOTAL_S),
# its output tee'd into the log; records rc, seconds and ok/FAILED/TIMED OUT in the summary.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_S - (SECONDS - T0) - 20))  # 20 s: timeout's kill grace and the copies
    if ((limit > left)); then limit=$left; fi
    if ((limit < 20)); then
        echo "$name: SKIPPED (${left} s left of TOTAL_S=${TOTAL_S})" | tee -a "$SUMMARY" "$LOG"
        FAILED=1
        return
    fi
    echo "=== step $name (limit ${limit} s, at $((SECONDS - T0)) s): $*" | tee -a "$LOG"
    local start=$SECONDS rc
    timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local what=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        what="TIMED OUT after ${limit} s"
    elif [ "$rc" != 0 ]; then
        what=FAILED
    fi
    [ "$rc" = 0 ] || FAILED=1
    echo "$name: $what (rc=$rc, $((SECONDS - start)) s)" | tee -a "$SUMMARY" "$LOG"
}

for s in $STEPS; do
    case $s in
    tests)
        per_test=$TEST_TIMEOUT_S
        if ((per_test > TESTS_S - 20)); then per_test=$((TESTS_S - 20)); fi  # a hung test is named, not the step killed
        if ((per_test < 10)); then per_test=10; fi
        step tests "$TESTS_S" python3 -m pytest -q -m gpu tests --timeout "$per_test" -rfEs --durations=15 \
            --junitxml="$OUT/gpu_tests.xml"
        ;;
    bench)
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
        step bench "$BENCH_S" python3 -m benchmarks gpu --out gpu $BENCH_ARGS
        cp benchmarks/results/gpu.json "$OUT"/ 2>/dev/null || echo "bench: no benchmarks/results/gpu.json" | tee -a "$LOG"
        ;;
    peers)
        # shellcheck disable=SC2086  # PEERS_ARGS is a list of words
        step peers "$PEERS_S" python3 benchmarks/peers/ptychi_vs_daskptycho.py --device gpu --out peers_gpu $PEERS_ARGS
        cp benchmarks/results/peers_gpu.json "$OUT"/ 2>/dev/null || echo "peers: no benchmarks/results/peers_gpu.json" | tee -a "$LOG"
        ;;
    *)
        echo "$s: UNKNOWN STEP (use tests, bench, peers)" | tee -a "$SUMMARY" "$LOG"
        FAILED=1
        ;;
    esac
done
echo "done in $((SECONDS - T0)) s" | tee -a "$SUMMARY" "$LOG"
exit "$FAILED"
