"""CXI 1.6 import/export: the real near-field PETRA III file, dm's near-field refusal,
round trips of datasets and results, and one-line errors for broken files."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import constants

import daskptycho as dp
from daskptycho.cli import main
from daskptycho.errors import DatasetError, OptionsError, OutputExistsError
from daskptycho.io.cxi import read_cxi, read_cxi_result, write_cxi

# vendored with the project (data/README.md): these tests run on every clone, never skip
REAL = Path(__file__).parents[1] / "data" / "PETRAIII_P25_Near_Field_Ptycho.cxi"


@pytest.fixture
def run(capsys):
    """The command line in-process (``main`` exactly as the console script calls it): (status, stdout, stderr)."""
    def _run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)
    return _run


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the real near-field file


def test_real_file_geometry_and_positions():
    before = sha(REAL)
    ds = read_cxi(REAL)
    assert sha(REAL) == before  # input never modified
    at = ds.attrs
    assert at["geometry"] == "near-field" and at["radiation"] == "xray"
    assert at["detector_distance_m"] == 1.12 and at["detector_pixel_size_m"] == 55e-6
    # independent facts: lambda = h c / E, E read in joules
    with h5py.File(REAL, "r") as f:
        e_j = float(f["entry_1/instrument_1/source_1/energy"][()])
        t = f["entry_1/sample_1/geometry_1/translation"][()].astype(np.float64)
        raw_mask = f["entry_1/instrument_1/detector_1/mask"][()]
        frame7 = f["entry_1/instrument_1/detector_1/data"][7]
    assert at["energy_eV"] == pytest.approx(e_j / constants.e, rel=1e-6)  # float32 in the file
    assert at["energy_eV"] == pytest.approx(12.66e3, rel=1e-3)
    assert at["wavelength_m"] == pytest.approx(constants.h * constants.c / e_j, rel=1e-6)
    assert at["wavelength_m"] == pytest.approx(9.79e-11, rel=1e-3)
    assert ds["intensity"].shape == (200, 100, 100) and ds["intensity"].dtype == np.float32
    np.testing.assert_array_equal(ds["intensity"].values[7], frame7.astype(np.float32))
    # default basis (rows along -y, columns along -x): probe centre = -translation projected -> (t_y, t_x)
    np.testing.assert_allclose(ds["position"].values, t[:, [1, 0]], rtol=0, atol=0)
    # CXI mask: non-zero bits flag bad pixels (5 in this file)
    assert at["mask_pixels_flagged"] == 5 == int((raw_mask != 0).sum())
    np.testing.assert_array_equal(ds["mask"].values, raw_mask == 0)
    # plane wave: real-space pixel = detector pixel; Fresnel number of the detector field (100 x 55 um)
    assert at["pixel_size_m"] == 55e-6 and at["magnification"] == 1.0
    f_number = (100 * 55e-6) ** 2 / (at["wavelength_m"] * 1.12)
    assert at["fresnel_number"] == pytest.approx(f_number, rel=1e-9) and at["fresnel_number"] > 1e4
    assert "no source-sample distance" in at["geometry_note"]


def test_real_file_cone_beam_fresnel_scaling():
    z1, z2 = 3.65e-3, 1.12
    ds = read_cxi(REAL, source_distance_m=z1)
    m = (z1 + z2) / z1
    assert ds.attrs["magnification"] == pytest.approx(m)
    assert ds.attrs["pixel_size_m"] == pytest.approx(55e-6 / m)
    assert ds.attrs["effective_distance_m"] == pytest.approx(z2 / m)
    assert ds.attrs["fresnel_number"] == pytest.approx((100 * 55e-6 / m) ** 2 / (ds.attrs["wavelength_m"] * z2 / m))
    assert ds.attrs["fresnel_number"] > 100  # still deep in the near field
    ext_px = np.ptp(ds["position"].values, axis=0) / ds.attrs["pixel_size_m"]
    assert 80 < ext_px.min() and ext_px.max() < 130  # the ~20 um scan spans about one 100 px field


def test_real_file_refused_by_dm(tmp_path):
    ds = read_cxi(REAL)
    # ml and gd reconstruct it (tests/test_near_field.py); dm's model is far-field only
    with pytest.raises(OptionsError) as e:
        dp.reconstruct(ds, engine="dm", iterations=1)
    assert e.value.option == "engine" and "far-field" in str(e.value) and "near-field" in str(e.value)
    # a near-field store exported to CXI comes back the same
    back = read_cxi(write_cxi(ds, tmp_path / "nf.cxi"))
    assert back.attrs["geometry"] == "near-field" and back.attrs["pixel_size_m"] == ds.attrs["pixel_size_m"]
    assert back.attrs["detector_distance_m"] == 1.12 and back.attrs["fresnel_number"] == pytest.approx(ds.attrs["fresnel_number"])
    np.testing.assert_array_equal(back["intensity"].values, ds["intensity"].values)
    np.testing.assert_array_equal(back["position"].values, ds["position"].values)
    np.testing.assert_array_equal(back["mask"].values, ds["mask"].values)
    # asking for far field explicitly gives the far-field pixel lambda z / (N p)
    ff = read_cxi(REAL, geometry="far-field")
    assert ff.attrs["geometry"] == "far-field"
    assert ff.attrs["pixel_size_m"] == pytest.approx(ff.attrs["wavelength_m"] * 1.12 / (100 * 55e-6))


def test_cli_import_info_and_refusal(run, tmp_path):
    store = tmp_path / "nf.zarr"
    p = run("import", REAL, store)
    assert p.returncode == 0, p.stderr
    assert "near-field" in p.stdout
    p = run("info", store)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for needle in ("geometry: near-field (Fresnel number 2.76e+05)", "detector distance: 1.12 m", "detector pixel: 5.5e-05 m (55 um)",
                   "wavelength 9.79491e-11 m", "(12.66 keV)", "patterns: 200 of 100 x 100 px",
                   "scan extent: 1.905e-05 m (y) x 2.016e-05 m (x)", "Fresnel propagation to the detector"):
        assert needle in out, (needle, out)
    # ml and gd reconstruct near-field stores (tests/test_near_field.py); dm refuses them
    p = run("reconstruct", store, "--out", tmp_path / "r.zarr", "--engine", "dm", "--iterations", "1")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "engine" in lines[0] and "near-field" in lines[0], lines
    assert not (tmp_path / "r.zarr").exists()


# --------------------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def xray_dataset():
    ds = dp.simulate(kind="image", scan=(4, 5), detector=16, seed=3)
    mask = np.ones((16, 16), dtype=bool)
    mask[3, 4] = mask[10, 0] = False
    ds["mask"] = (("ky", "kx"), mask)
    ds["probe"] = ds["truth_probe"].copy()
    return ds


def test_dataset_round_trip(tmp_path, xray_dataset):
    ds = xray_dataset
    path = write_cxi(ds, tmp_path / "d.cxi")
    assert os.listdir(tmp_path) == ["d.cxi"]  # no temporary left behind
    with h5py.File(path, "r") as f:
        assert int(f["cxi_version"][()]) == 160
        assert f["entry_1/data_1/data"].shape == (20, 16, 16)  # the link to the detector frames
        assert int(f["entry_1/instrument_1/detector_1/mask"][3, 4]) == 1  # CXI: bit set = bad pixel
        assert f["entry_1/instrument_1/source_1/energy"][()] == pytest.approx(8e3 * constants.e)
    back = read_cxi(path)
    assert back.attrs["geometry"] == "far-field"
    np.testing.assert_array_equal(back["intensity"].values, ds["intensity"].values)
    np.testing.assert_array_equal(back["position"].values, ds["position"].values)
    np.testing.assert_array_equal(back["mask"].values, ds["mask"].values)
    np.testing.assert_array_equal(back["probe"].values, ds["probe"].values)
    for key in ("wavelength_m", "energy_eV", "pixel_size_m"):
        assert back.attrs[key] == pytest.approx(ds.attrs[key], rel=1e-12), key
    assert back.attrs["radiation"] == "xray"
    with pytest.raises(OutputExistsError):
        write_cxi(ds, path)


def test_electron_dataset_round_trip_through_cli(run, tmp_path, small_pbtio3):
    cxi = tmp_path / "e.cxi"
    p = run("export", small_pbtio3, cxi)
    assert p.returncode == 0, p.stderr
    p = run("import", cxi, tmp_path / "e.zarr")
    assert p.returncode == 0, p.stderr
    a, b = dp.open_dataset(small_pbtio3), dp.open_dataset(tmp_path / "e.zarr")
    assert b.attrs["radiation"] == "electron" and b.attrs["geometry"] == "far-field"
    np.testing.assert_array_equal(a["intensity"].values, b["intensity"].values)
    np.testing.assert_array_equal(a["position"].values, b["position"].values)
    assert b.attrs["pixel_size_m"] == pytest.approx(a.attrs["pixel_size_m"], rel=1e-12)
    assert b.attrs["wavelength_m"] == pytest.approx(a.attrs["wavelength_m"], rel=1e-12)
    p = run("export", small_pbtio3, cxi)
    assert p.returncode == 2 and "--overwrite" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_result_round_trip(run, tmp_path, small_pbtio3, client):
    res = dp.reconstruct(small_pbtio3, engine="ml", iterations=2, slices=2, client=client)
    store = tmp_path / "r.zarr"
    dp.write_result(res, store)
    p = run("export", store, tmp_path / "r.cxi")
    assert p.returncode == 0, p.stderr
    back = read_cxi_result(tmp_path / "r.cxi")
    np.testing.assert_array_equal(back["object"].values, res["object"].values)
    np.testing.assert_array_equal(back["probe"].values, res["probe"].values)
    np.testing.assert_array_equal(back["cost"].values, res["cost"].values)
    np.testing.assert_array_equal(back["y"].values, res["y"].values)
    np.testing.assert_array_equal(back["x"].values, res["x"].values)
    np.testing.assert_array_equal(back["position"].values, dp.open_dataset(small_pbtio3)["position"].values)
    assert back.attrs["pixel_size_m"] == pytest.approx(res.attrs["pixel_size_m"], rel=1e-9)
    with h5py.File(tmp_path / "r.cxi", "r") as f:
        assert int(f["cxi_version"][()]) == 160
        assert f["entry_1/image_1/data_type"][()].decode() == "amplitude"
        assert f["entry_1/image_1/data"].attrs["axes"] == "z:y:x"
        assert f["entry_1/instrument_1/source_1/probe"].dtype == np.complex64
    p = run("export", store, tmp_path / "r.tif")  # and the phase stack for Fiji, from the same real result
    assert p.returncode == 0, p.stderr
    tifffile = pytest.importorskip("tifffile")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "r.tif"), np.angle(res["object"].values).astype(np.float32))


# --------------------------------------------------------------------------- broken files


def _write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 160
        for name, value in datasets.items():
            f[name.replace(".", "/")] = value
    return path


GOOD = {
    "entry_1.instrument_1.detector_1.data": np.ones((3, 8, 8), np.int32),
    "entry_1.instrument_1.detector_1.distance": 2.0,
    "entry_1.instrument_1.detector_1.x_pixel_size": 75e-6,
    "entry_1.instrument_1.detector_1.y_pixel_size": 75e-6,
    "entry_1.instrument_1.source_1.energy": 8e3 * constants.e,
    "entry_1.sample_1.geometry_1.translation": np.zeros((3, 3)) + np.arange(3)[:, None] * 1e-7,
}


@pytest.mark.parametrize("change, field", [
    ({"entry_1.instrument_1.detector_1.data": None}, "entry_1/instrument_1/detector_1/data"),
    ({"entry_1.instrument_1.detector_1.data": np.ones((8, 8))}, "entry_1/instrument_1/detector_1/data"),
    ({"entry_1.sample_1.geometry_1.translation": None}, "entry_1/sample_1/geometry_1/translation"),
    ({"entry_1.sample_1.geometry_1.translation": np.zeros((2, 3))}, "entry_1/sample_1/geometry_1/translation"),
    ({"entry_1.instrument_1.detector_1.distance": None}, "entry_1/instrument_1/detector_1/distance"),
    ({"entry_1.instrument_1.source_1.energy": None}, "entry_1/instrument_1/source_1/energy"),
    ({"entry_1.instrument_1.detector_1.mask": np.ones((4, 4), np.uint32)}, "entry_1/instrument_1/detector_1/mask"),
    ({"entry_1.instrument_1.detector_1.basis_vectors": np.ones((4, 4))}, "entry_1/instrument_1/detector_1/basis_vectors"),
])
def test_broken_files_name_the_hdf5_path(tmp_path, change, field):
    content = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = _write_h5(tmp_path / "bad.cxi", **content)
    with pytest.raises(DatasetError) as e:
        read_cxi(path)
    assert e.value.field == field


def test_good_minimal_file_and_cli_errors(run, tmp_path):
    ds = read_cxi(_write_h5(tmp_path / "ok.cxi", **GOOD))
    assert ds.attrs["geometry"] == "far-field" and ds.sizes["scan"] == 3
    assert ds.attrs["pixel_size_m"] == pytest.approx(ds.attrs["wavelength_m"] * 2.0 / (8 * 75e-6))
    bad = _write_h5(tmp_path / "bad.cxi", **{k: v for k, v in GOOD.items() if not k.endswith("detector_1.data")})
    p = run("import", bad, tmp_path / "x.zarr")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "entry_1/instrument_1/detector_1/data" in lines[0]
    (tmp_path / "junk.cxi").write_bytes(b"not hdf5 at all")
    p = run("import", tmp_path / "junk.cxi", tmp_path / "y.zarr")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "HDF5" in p.stderr
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()
