#!/usr/bin/env bash
# Make benchmarks/peers/.venv: Pty-Chi on CPU PyTorch, plus daskptycho itself (editable), so the
# comparison script can simulate with daskptycho and run both codes in one process.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$here/.venv/bin/python" ]; then
    "$python" -m venv "$here/.venv"
fi
"$here/.venv/bin/python" -m pip install -q --upgrade pip
"$here/.venv/bin/python" -m pip install -q -r "$here/requirements.txt"
"$here/.venv/bin/python" -m pip install -q -e "$root[fast]"
"$here/.venv/bin/python" -c "import torch, ptychi; print('torch', torch.__version__, 'ptychi', getattr(ptychi, '__version__', '?'))"
