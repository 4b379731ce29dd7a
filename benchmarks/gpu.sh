#!/usr/bin/env bash
# Run the benchmarks on a lent GPU machine (the `device` tool), writing
# benchmarks/results/*_gpu.json into $OUT (the folder the tool brings back).
#
# STATUS: ready, NOT YET RUN: the task that wrote it had no GPU lent (status:
# can_start_another=false). docs/performance.md says so until a run fills the GPU rows.
#
# The device machine starts bare and reaches no network, so the wheels travel with the
# working tree in .whl/ (ignored by git; carried with `carry: [".whl"]`, 64 MiB at most):
#
#   # here, once (on the same Python minor version as the device machine):
#   .venv/bin/python -m pip download -d .whl -e ".[fast]" cupy-cuda12x   # see the size note below
#   # then, with the device tool:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
#
# Size note: cupy-cuda12x alone is ~100 MiB, over the 64 MiB a call may carry. Two ways:
# carry .whl without cupy if the machine's Python already has CuPy (the script checks),
# or split the wheels over two calls into a folder the second call keeps (a warm machine
# keeps ignored build outputs between calls: "ignored build outputs already there are kept").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY=python3
VENV="${VENV:-/tmp/daskptycho-gpuvenv}"  # outside the tree: nothing to ignore
if [ ! -x "$VENV"/bin/python ]; then
    $PY -m venv "$VENV"
    if [ -d .whl ]; then
        "$VENV"/bin/python -m pip install -q --no-index --find-links .whl -e ".[fast]" cupy-cuda12x \
            || "$VENV"/bin/python -m pip install -q --no-index --find-links .whl -e ".[fast]"
    else
        "$VENV"/bin/python -m pip install -q -e ".[fast]"
    fi
fi
PYV="$VENV"/bin/python
$PYV - <<'PY'
import sys
try:
    import cupy
    print("cupy", cupy.__version__, "devices:", cupy.cuda.runtime.getDeviceCount())
except Exception as e:  # noqa: BLE001
    print("no usable CuPy on this machine:", e)
    sys.exit(3)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_device.txt"
# 1. FFT rates incl. cupy.fft, and the FFT count of one iteration (the CPU floor for reference)
$PYV -m benchmarks fft_floor --out fft_floor_gpu
# 2. every engine with device=gpu (tiles pinned to workers; each worker drives the one GPU here)
$PYV -m benchmarks engines --device gpu --out engines_gpu --cases "ml;gd 1 tile;gd 4 tiles;hve 4 tiles"
cp benchmarks/results/fft_floor_gpu.json benchmarks/results/engines_gpu.json "$OUT"/ 2>/dev/null || true
