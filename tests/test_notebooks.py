"""The notebooks run, top to bottom, in a real Jupyter kernel at small sizes, and say what they should;
the committed notebooks carry their outputs (figures included, no errors) for readers on the web.

Each notebook starts its own LocalCluster from inside the kernel (as a user would). The
kernel is this interpreter's (``sys.executable``, the project's virtualenv): its kernelspec
is written to a temporary Jupyter path so no other ``python3`` kernel on the machine can be
picked up by mistake.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (extra 'test')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (extra 'test')")
kernelspec = pytest.importorskip("ipykernel.kernelspec", reason="ipykernel is not installed (extra 'test')")

ROOT = Path(__file__).parents[1]
KERNEL = "daskptycho-test"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter / "kernels" / KERNEL
    kernelspec.write_kernel_spec(path=str(spec_dir))
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable  # the kernel runs this virtualenv's Python
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(jupyter))
    mp.setenv("DASKPTYCHO_NB_SMALL", "1")
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    mp.delenv("DASKPTYCHO_NB_WORKDIR", raising=False)
    yield
    mp.undo()


def committed(name):
    """The committed notebook, with its outputs: they are what a reader sees on a web page
    (GitHub renders them), so every figure is there, and nothing in them is an error."""
    path = ROOT / "notebooks" / name
    assert path.stat().st_size < 1_000_000, "keep the saved outputs small (modest PNGs, no long text)"
    raw = path.read_text()
    for local in (str(ROOT), "/tmp/", "/home/", "/Users/"):
        assert local not in raw, f"an absolute local path ({local}...) in the saved outputs"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), f"not executed top to bottom in one run: {counts}"
    text = []
    for cell in code:
        outputs = cell.get("outputs", [])
        for out in outputs:
            assert out.output_type != "error", out
            assert not (out.output_type == "stream" and "Traceback" in out.text), out.text
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                text.append(out.data.get("text/plain", ""))
        if re.search(r"plt\.show\(\)|display\([\w.]*figure\(", cell.source):  # a cell that makes a figure
            assert any("image/png" in out.get("data", {}) for out in outputs), f"no figure saved for:\n{cell.source}"
    return nb, "\n".join(text)


def execute(name, cwd):
    nb, _ = committed(name)
    assert "parameters" in nb.cells[1].metadata.get("tags", [])
    # run a copy from scratch: the saved outputs must not feed into this run
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=240, resources={"metadata": {"path": str(cwd)}})
    client.execute()
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", out
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                images += "image/png" in out.data
                text.append(out.data.get("text/plain", ""))
    return "\n".join(text), images


def test_committed_quickstart_shows_its_figures_and_the_live_page():
    nb, text = committed("quickstart.ipynb")
    assert re.search(r"live reconstruction page: http://127\.0\.0\.1:\d+/daskptycho\n", text), text
    assert sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", [])) >= 3


def test_committed_flyscan_shows_its_figures():
    nb, text = committed("flyscan_multimode.ipynb")
    assert re.search(r"\d mode\(s\): final cost", text), text
    assert sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", [])) >= 2


def test_quickstart(kernel_env, tmp_path):
    text, images = execute("quickstart.ipynb", tmp_path)
    # the live page (the dashboard's /status replaced by /daskptycho), and it answers
    assert re.search(r"live reconstruction page: http://127\.0\.0\.1:\d+/daskptycho\n", text), text
    assert re.search(r"live reconstruction page http://127\.0\.0\.1:\d+/daskptycho: HTTP 200", text), text
    assert "dask-backed: True" in text
    r = float(re.search(r"phase correlation with the truth: r = ([0-9.]+)", text).group(1))
    assert r > 0.9, text
    # the streaming section: rounds while the scan goes on, the last over every frame
    assert re.search(r"round from iteration \d+: \d+ frames, scan finished", text), text
    r_live = float(re.search(r"followed scan: phase correlation with the truth r = ([0-9.]+)", text).group(1))
    assert r_live > 0.9, text
    assert images >= 3  # the mean pattern, the phase-vs-truth figure, the cost
    out = tmp_path / "quickstart-output"
    assert "Dask Performance Report" in (out / "quickstart-report.html").read_text()
    assert (out / "result.zarr").is_dir() and (out / "result.cxi").stat().st_size > 0 and (out / "phase.tif").stat().st_size > 0


def test_flyscan_multimode(kernel_env, tmp_path):
    text, images = execute("flyscan_multimode.ipynb", tmp_path)
    errors = {int(m): float(e) for m, e in re.findall(r"(\d+) mode\(s\): final cost [0-9.e+]+, mean error vs truth ([0-9.]+)", text)}
    assert set(errors) == {1, 3}, text
    assert errors[3] < errors[1], text  # the fly-scan blur needs the extra modes
    fractions = re.search(r"3 mode\(s\):.*power fractions \[([^\]]+)\]", text).group(1)
    assert sum(float(v) for v in fractions.split(",")) == pytest.approx(1.0, abs=2e-3)
    assert images >= 2  # the modes and the phase comparison
