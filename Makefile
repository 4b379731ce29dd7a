# Two commands on a fresh machine: `make demo` and `make test` (they set up .venv themselves).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo-output

.PHONY: demo test install lint clean graphs bench

# One gd iteration's task graph and a real 3x3 run's timeline into graphs/
graphs: install
	$(VENV)/bin/daskptycho graph --tiles 3x3 --out graphs --timeline

# Benchmarks (not tests): JSON into benchmarks/results/, then docs/performance.md from them.
# The Pty-Chi comparison has its own venv and is not run here (benchmarks/peers/).
bench: install
	$(PY) -m benchmarks seams
	$(PY) -m benchmarks memory
	$(PY) -m benchmarks fft_floor
	$(PY) -m benchmarks engines
	DASK_DASKPTYCHO__CLUSTER__MESSAGE_INTERVAL=default $(PY) -m benchmarks engines --out engines_batched \
		--cases "ml;gd 1 tile;gd 4 tiles;gd 4 tiles on 1 worker"
	$(PY) -m benchmarks scaling
	$(PY) -m benchmarks report

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Simulate a small PbTiO3 dataset, reconstruct it on an embedded LocalCluster, write PNGs,
# a Dask performance report (task timeline) and the phase correlation with the truth.
demo: install
	rm -rf $(DEMO)
	$(VENV)/bin/daskptycho simulate $(DEMO)/pbtio3.zarr --kind pbtio3 --scan 16x16 --detector 64 --slices 4
	$(VENV)/bin/daskptycho reconstruct $(DEMO)/pbtio3.zarr --engine gd --tiles 2x2 --slices 4 --iterations 30 \
		--workers 2 --out $(DEMO)/result.zarr --report $(DEMO)/report.html
	$(VENV)/bin/daskptycho view $(DEMO)/result.zarr --out $(DEMO)/png --truth $(DEMO)/pbtio3.zarr
	@echo "demo: images in $(DEMO)/png, timeline in $(DEMO)/report.html"

# the layer and no-cycle contracts of pyproject.toml first (seconds), then the suite
# PYTHONNODEBUGRANGES: Python 3.11 draws a traceback's ^^^ markers with ast.parse, whose
# constructor state threads share (python/cpython#106905); a lost worker's traceback logged
# by distributed's loop thread then breaks pytest's rewriting of a module imported meanwhile
test: install
	$(VENV)/bin/lint-imports
	PYTHONNODEBUGRANGES=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
