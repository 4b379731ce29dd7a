"""TIFF export: ImageJ phase (and amplitude) stacks that Fiji opens with their scale."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import xarray as xr

import daskptycho as dp
from daskptycho.cli import main
from daskptycho.errors import OutputExistsError
from daskptycho.io.tiff import amplitude_path, write_tiff

tifffile = pytest.importorskip("tifffile", reason="tifffile (optional, extra 'export') is not installed")


@pytest.fixture
def run(capsys):
    def _run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)
    return _run


@pytest.fixture(scope="module")
def result_store(tmp_path_factory):
    """A result store (docs/format.md) holding a simulated 3-slice object with phases beyond +-pi."""
    ds = dp.simulate(kind="pbtio3", scan=(3, 3), detector=16, slices=3, max_angle_rad=60e-3)
    obj = ds["truth_object"].values.astype(np.complex64)
    rng = np.random.default_rng(0)
    obj = (obj * np.exp(1j * rng.uniform(-4, 4, obj.shape)) * rng.uniform(0.5, 1.0, obj.shape)).astype(np.complex64)
    res = xr.Dataset(
        {"object": (("slice", "y", "x"), obj), "probe": (("mode", "py", "px"), ds["truth_probe"].values),
         "probe_power_fraction": (("mode",), [1.0]), "cost": (("iteration",), [2.0, 1.0])},
        coords={"y": ds["y"].values, "x": ds["x"].values, "slice": np.arange(3), "iteration": [0, 1]},
        attrs={"engine": "ml", "pixel_size_m": ds.attrs["pixel_size_m"], "slice_thickness_m": ds.attrs["slice_thickness_m"],
               "wavelength_m": ds.attrs["wavelength_m"], "energy_eV": ds.attrs["energy_eV"], "radiation": "electron"},
    )
    path = tmp_path_factory.mktemp("res") / "r.zarr"
    dp.write_result(res, path)
    return path


def test_phase_stack_reads_back_with_imagej_metadata(tmp_path, result_store):
    res = dp.open_result(result_store)
    obj = res["object"].values
    out = write_tiff(res, tmp_path / "phase.tif", amplitude=True)
    assert [p for p, _ in out] == [str(tmp_path / "phase.tif"), amplitude_path(tmp_path / "phase.tif")]
    assert sorted(os.listdir(tmp_path)) == ["phase.tif", "phase_amplitude.tif"]  # no temporaries left
    with tifffile.TiffFile(tmp_path / "phase.tif") as t:
        assert t.is_imagej and len(t.pages) == 3
        assert t.series[0].axes == "ZYX" and t.series[0].shape == obj.shape
        stack = t.asarray()
        meta = t.imagej_metadata
        xres = t.pages[0].tags["XResolution"].value
        yres = t.pages[0].tags["YResolution"].value
    assert stack.dtype == np.float32
    np.testing.assert_array_equal(stack, np.angle(obj).astype(np.float32))
    assert np.abs(stack).max() <= np.pi and np.abs(stack).max() > 3  # wrapped phases, the full range used
    dx_um = res.attrs["pixel_size_m"] * 1e6
    assert meta["unit"] == "um" and meta["slices"] == 3
    assert meta["spacing"] == pytest.approx(res.attrs["slice_thickness_m"] * 1e6)
    for num, den in (xres, yres):  # pixels per micrometre
        assert num / den == pytest.approx(1 / dx_um, rel=1e-6)
    amp = tifffile.imread(amplitude_path(tmp_path / "phase.tif"))
    np.testing.assert_array_equal(amp, np.abs(obj).astype(np.float32))
    with pytest.raises(OutputExistsError):
        write_tiff(res, tmp_path / "phase.tif")


def test_cli_export_tiff(run, tmp_path, result_store):
    p = run("export", result_store, tmp_path / "p.tiff")
    assert p.returncode == 0, p.stderr
    assert "phase (rad), 3 slice(s)" in p.stdout
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "p.tiff"), np.angle(dp.open_result(result_store)["object"].values))
    p = run("export", result_store, tmp_path / "p.tiff")
    assert p.returncode == 2 and "--overwrite" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run("export", result_store, tmp_path / "p.tiff", "--overwrite", "--amplitude")
    assert p.returncode == 0 and (tmp_path / "p_amplitude.tiff").exists()
    p = run("export", result_store, tmp_path / "p.png")
    assert p.returncode == 2 and ".cxi" in p.stderr and ".tif" in p.stderr
