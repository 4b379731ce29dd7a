#!/usr/bin/env bash
# Make benchmarks/independent/.venv: abTEM (and ase) for the independent quality benchmark's
# electron data (benchmarks/independent.py). A venv of its own because abTEM's pins must not
# disturb the project venv; the data it writes (.npz) are turned into daskptycho stores by the
# project venv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$here/.venv/bin/python" ]; then
    "$python" -m venv "$here/.venv"
fi
"$here/.venv/bin/python" -m pip install -q --upgrade pip
"$here/.venv/bin/python" -m pip install -q -r "$here/requirements.txt"
"$here/.venv/bin/python" -c "import abtem, ase; print('abtem', abtem.__version__, 'ase', ase.__version__)"
