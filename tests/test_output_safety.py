"""Output safety: existing outputs are refused without --overwrite, and a write killed
half-way never leaves a store that looks complete (nor loses the old one)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr

import daskptycho as dp
from daskptycho.cli import main
from daskptycho.errors import DatasetError, OutputExistsError


def tree_hash(path):
    out = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def cli(*args):
    """``daskptycho ARGS`` in this process (a real process per call would spend most of
    the test importing): (exit status, stdout, stderr lines)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue().splitlines()


def small_result(value=1.0, shape=(1, 8, 8)):
    return xr.Dataset(
        {"object": (("slice", "y", "x"), np.full(shape, value, np.complex64), {"units": "1"}),
         "probe": (("mode", "py", "px"), np.ones((1, 4, 4), np.complex64), {"units": "sqrt(counts)"}),
         "cost": (("iteration",), np.array([2.0, 1.0]), {"units": "counts"})},
        attrs={"engine": "ml", "pixel_size_m": 1e-10},
    )


# --------------------------------------------------------------------------- refusing to overwrite


def test_every_writing_command_refuses_an_existing_output(tmp_path, small_pbtio3):
    """simulate, import and reconstruct: exit 2 with one line naming --overwrite, the
    existing output untouched; with --overwrite it is replaced."""
    # simulate
    sim = tmp_path / "sim.zarr"
    assert cli("simulate", sim, "--scan", "3x3", "--detector", "16", "--seed", "1")[0] == 0
    before = tree_hash(sim)
    code, _, err = cli("simulate", sim, "--scan", "3x3", "--detector", "16", "--seed", "2")
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0] and "Traceback" not in err[0]
    assert tree_hash(sim) == before
    assert cli("simulate", sim, "--scan", "3x3", "--detector", "16", "--seed", "2", "--overwrite")[0] == 0
    assert tree_hash(sim) != before
    dp.open_dataset(sim)

    # import (generic npz)
    ds = dp.open_dataset(sim)
    npz = tmp_path / "m.npz"
    np.savez(npz, intensity=ds["intensity"].values, position=ds["position"].values)
    imp = tmp_path / "imp.zarr"
    common = ("--radiation", "electron", "--energy", "200e3", "--pixel-size", str(ds.attrs["pixel_size_m"]))
    assert cli("import", npz, imp, *common)[0] == 0
    before = tree_hash(imp)
    code, _, err = cli("import", npz, imp, *common)
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0]
    assert tree_hash(imp) == before
    assert cli("import", npz, imp, *common, "--overwrite")[0] == 0

    # reconstruct: refused before any work (no cluster, no temporary store)
    out = tmp_path / "r.zarr"
    out.mkdir()
    (out / "precious.txt").write_text("not a result, but mine")
    code, _, err = cli("reconstruct", small_pbtio3, "--out", out, "--engine", "ml", "--iterations", "1", "--slices", "2")
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0]
    assert (out / "precious.txt").read_text() == "not a result, but mine"
    assert sorted(os.listdir(tmp_path)) == ["imp.zarr", "m.npz", "r.zarr", "sim.zarr"]
    code, _, err = cli("reconstruct", small_pbtio3, "--out", out, "--engine", "ml", "--iterations", "1", "--slices", "2",
                       "--workers", "1", "--overwrite", "--quiet")
    assert code == 0, err
    assert dp.open_result(out).sizes["iteration"] == 1 and not (out / "precious.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["imp.zarr", "m.npz", "r.zarr", "sim.zarr"]  # no temporary left


def test_library_writers_refuse_and_replace_atomically(tmp_path):
    path = tmp_path / "res.zarr"
    dp.write_result(small_result(1.0), path)
    before = tree_hash(path)
    with pytest.raises(OutputExistsError):
        dp.write_result(small_result(2.0), path)
    assert tree_hash(path) == before
    dp.write_result(small_result(3.0), path, overwrite=True)
    np.testing.assert_array_equal(dp.open_result(path)["object"].values, 3.0)
    assert os.listdir(tmp_path) == ["res.zarr"]  # the old store went with the swap
    # a plain file in the way is replaced as well, only when asked
    f = tmp_path / "file.zarr"
    f.write_text("x")
    with pytest.raises(OutputExistsError):
        dp.write_result(small_result(), f)
    dp.write_result(small_result(4.0), f, overwrite=True)
    np.testing.assert_array_equal(dp.open_result(f)["object"].values, 4.0)


# --------------------------------------------------------------------------- killed writes

_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    import xarray as xr
    import daskptycho as dp

    path, overwrite = sys.argv[1], sys.argv[2] == "1"
    rng = np.random.default_rng(0)
    # large-ish and incompressible: 64 MiB in 64 chunks of 1 MiB, a fraction of a second or more to write
    obj = (rng.random((2, 2048, 2048), np.float32) + 1j * rng.random((2, 2048, 2048), np.float32)).astype(np.complex64)
    ds = xr.Dataset({"object": (("slice", "y", "x"), obj, {"units": "1"}),
                     "probe": (("mode", "py", "px"), np.ones((1, 4, 4), np.complex64), {"units": "sqrt(counts)"}),
                     "cost": (("iteration",), np.array([1.0]), {"units": "counts"})},
                    attrs={"engine": "ml", "pixel_size_m": 1e-10})
    ds["object"].encoding = {}
    print("writing", flush=True)
    dp.write_result(ds.chunk({"y": 256, "x": 512}), path, overwrite=overwrite)
    print("done", flush=True)
""")


def _kill_mid_write(tmp_path, path, overwrite):
    """Start a writer process, SIGKILL it once its temporary store holds some object
    chunks (the write is then under way, not finished); return the temporary's path."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    name = os.path.basename(path)
    proc = subprocess.Popen([sys.executable, str(script), str(path), "1" if overwrite else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            temps = [e for e in os.listdir(tmp_path) if e.startswith(f".{name}.tmp-")]
            if temps:
                chunk_dir = tmp_path / temps[0] / "object" / "c"
                n = sum(len(f) for _, _, f in os.walk(chunk_dir)) if chunk_dir.exists() else 0
                if n >= 4:
                    tmp = tmp_path / temps[0]
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and tmp is None:
            proc.kill()
        out, err = proc.communicate(timeout=60)
    assert tmp is not None, f"the writer was not caught mid-write: {out} {err}"
    assert proc.returncode == -signal.SIGKILL and "done" not in out
    return tmp


def test_killed_write_leaves_no_store_and_a_refused_temporary(tmp_path):
    path = tmp_path / "result.zarr"
    tmp = _kill_mid_write(tmp_path, path, overwrite=False)
    assert not os.path.lexists(path)  # nothing at the final path: no half-written result that looks complete
    assert tmp.is_dir()
    for opener in (dp.open_result, dp.open_dataset):
        with pytest.raises(DatasetError) as e:
            opener(tmp)
        assert e.value.field == "store" and "interrupted write" in e.value.problem
    # the command line refuses it too, in one line (a real process here)
    p = subprocess.run([sys.executable, "-m", "daskptycho", "info", str(tmp)], capture_output=True, text=True, timeout=300)
    code, err = p.returncode, p.stderr.splitlines()
    assert code == 2 and len(err) == 1 and "interrupted write" in err[0]
    # a later write to the same path is not blocked by the leftover
    dp.write_result(small_result(5.0), path)
    np.testing.assert_array_equal(dp.open_result(path)["object"].values, 5.0)


def test_killed_overwrite_keeps_the_old_result(tmp_path):
    path = tmp_path / "result.zarr"
    dp.write_result(small_result(7.0), path)
    before = tree_hash(path)
    _kill_mid_write(tmp_path, path, overwrite=True)
    assert tree_hash(path) == before
    np.testing.assert_array_equal(dp.open_result(path)["object"].values, 7.0)


def test_a_store_renamed_from_an_incomplete_write_is_refused(tmp_path):
    """Even under another name, a store missing chunk files is not taken for complete."""
    path = tmp_path / "r.zarr"
    dp.write_result(small_result(1.0, shape=(2, 8, 8)), path)
    chunk = next(os.path.join(r, f) for r, _, fs in os.walk(path / "object" / "c") for f in fs)
    os.remove(chunk)
    with pytest.raises(DatasetError) as e:
        dp.open_result(path)
    assert e.value.field == "object" and "missing" in e.value.problem


def _intrude(block, path):
    """Runs while the store is being written: another writer finishes first."""
    if not os.path.exists(path):
        os.makedirs(os.path.join(path, "theirs"))
    return block


def test_a_result_that_appears_during_the_write_is_not_replaced(tmp_path):
    """Two runs racing for one output: the one that finishes second is refused (its
    rename is never a replace), the first result stays, no temporary is left behind."""
    import dask.array as da

    path = tmp_path / "race.zarr"
    ds = small_result(1.0)
    ds["object"] = (("slice", "y", "x"), da.from_array(ds["object"].values, chunks=(1, 4, 4)).map_blocks(_intrude, str(path)), {"units": "1"})
    with pytest.raises(OutputExistsError):
        dp.write_result(ds, path)
    assert os.listdir(path) == ["theirs"]
    assert os.listdir(tmp_path) == ["race.zarr"]
