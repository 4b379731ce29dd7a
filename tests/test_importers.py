"""Importers: the real Siemens-star test data (Tike, measured at the APS) and the generic
npz layout; nothing is ever unpickled."""

from __future__ import annotations

import bz2
import io
import os

import numpy as np
import pytest

import daskptycho
from daskptycho import physics
from daskptycho.errors import DatasetError
from daskptycho.io import validate_dataset
from daskptycho.io.importers import GEOMETRY_NOMINAL, TIKE_LICENCE, import_npz, import_siemens_star

# vendored with the project (data/README.md): these tests run on every clone, never skip
STAR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "data", "siemens-star-small.npz.bz2"))


def _load_raw():
    """The file as it is, read independently of the importer."""
    with open(STAR, "rb") as f, np.load(io.BytesIO(bz2.decompress(f.read())), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def raw():
    return _load_raw()


@pytest.fixture(scope="module")
def star():
    return import_siemens_star(STAR)


# --------------------------------------------------------------------------- Siemens star


def test_star_imports_and_validates(star, raw):
    validate_dataset(star, check_values=True)
    assert star["intensity"].shape == (516, 128, 128)
    assert star["intensity"].dtype == np.float32
    assert star.attrs["radiation"] == "xray"
    assert star.attrs["energy_eV"] == 8.8e3
    assert star.attrs["pixel_size_m"] == 1e-8
    assert star.attrs["wavelength_m"] == pytest.approx(physics.xray_wavelength(8.8e3), rel=1e-12)
    assert star.attrs["geometry_nominal"] == GEOMETRY_NOMINAL
    assert star.attrs["licence"] == TIKE_LICENCE and "LICENSE-tike.txt" in star.attrs["licence"]
    assert star.attrs["negative_counts_clipped"] == 0
    assert star.attrs["nonfinite_counts_zeroed"] == 0
    # counts are the file's, moved (not changed) by the fftshift
    np.testing.assert_array_equal(star["intensity"].values, np.fft.fftshift(raw["data"][0], axes=(-2, -1)))


def test_star_patterns_are_centred(star, raw):
    """In the file the zero frequency is at the corners; after import the mean pattern's
    power-weighted centre lies within 3 px of (64, 64). (Its brightest pixel does not:
    the zone plate's central stop makes the bright field an annulus around a dim disc,
    and that dim disc is now at the centre.)"""
    mean = star["intensity"].values.astype(np.float64).mean(axis=0)
    yy, xx = np.indices(mean.shape)
    cy, cx = (mean * yy).sum() / mean.sum(), (mean * xx).sum() / mean.sum()
    assert abs(cy - 64) < 3 and abs(cx - 64) < 3
    centre = mean[32:96, 32:96].mean()
    border = np.concatenate([mean[:16].ravel(), mean[-16:].ravel(), mean[:, :16].ravel(), mean[:, -16:].ravel()]).mean()
    assert centre > 100 * border  # the bright field is in the middle, high angles are dark
    brightest = np.unravel_index(np.argmax(mean), mean.shape)
    assert np.hypot(brightest[0] - 64, brightest[1] - 64) < 32  # on the bright annulus around the centre
    # the file's own layout was the other way round
    file_mean = raw["data"][0].astype(np.float64).mean(axis=0)
    assert file_mean[32:96, 32:96].mean() < 0.01 * file_mean.max()
    # the dim disc of the central stop sits on the centre pixel
    assert mean[60:69, 60:69].mean() < 0.2 * mean[32:96, 32:96].max()


def test_star_positions_are_metres(star, raw):
    dx = star.attrs["pixel_size_m"]
    scan = raw["scan"][0].astype(np.float64)
    pos = star["position"].values
    assert pos.shape == (516, 2) and pos.dtype == np.float64
    # (row, column) pixels -> (y, x) metres, window corner -> probe centre (N // 2 = 64),
    # shifted so the first corner is at 0
    expect = (scan - scan.min(axis=0) + 64) * dx
    np.testing.assert_allclose(pos, expect, rtol=1e-12, atol=1e-9 * dx)
    np.testing.assert_allclose(np.diff(pos, axis=0), np.diff(scan, axis=0) * dx, rtol=1e-9, atol=1e-9 * dx)
    np.testing.assert_allclose(star.attrs["position_shift_px"], 64 - scan.min(axis=0))
    assert pos.min() >= 0
    # a different nominal pixel just rescales
    other = import_siemens_star(STAR, pixel_size_m=2e-8)
    np.testing.assert_allclose(other["position"].values, 2 * pos, rtol=1e-12)


def test_star_probe_guess(star, raw):
    probe = star["probe"].values
    assert probe.shape == (1, 128, 128) and probe.dtype == np.complex64
    # the file's probe is centred already: stored as is, only rescaled to sqrt(counts)
    assert not star.attrs["probe_fftshifted"]
    filep = raw["probe"].reshape(128, 128).astype(np.complex128)
    scale = star.attrs["probe_rescaled_by"]
    np.testing.assert_allclose(probe[0], filep * scale, rtol=1e-5, atol=1e-6 * np.abs(filep).max() * scale)
    power = np.abs(probe.astype(np.complex128)) ** 2
    yy, xx = np.indices((128, 128))
    assert abs((power[0] * yy).sum() / power.sum() - 64) < 8
    assert abs((power[0] * xx).sum() / power.sum() - 64) < 8
    mean_total = star["intensity"].values.astype(np.float64).sum(axis=(1, 2)).mean()
    assert power.sum() == pytest.approx(mean_total, rel=1e-5)


def test_star_total_counts_match_the_file(star, raw):
    got = star["intensity"].values.astype(np.float64)
    want = raw["data"][0].astype(np.float64)
    np.testing.assert_allclose(got.mean(axis=0).sum(), want.mean(axis=0).sum(), rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=(1, 2)), want.sum(axis=(1, 2)), rtol=1e-12)


def test_star_writes_and_reopens(star, tmp_path):
    path = tmp_path / "star.zarr"
    daskptycho.write_dataset(star, path)
    ds = daskptycho.open_dataset(path)
    assert ds["intensity"].shape == (516, 128, 128)
    np.testing.assert_array_equal(ds["intensity"].values, star["intensity"].values)
    np.testing.assert_array_equal(ds["position"].values, star["position"].values)
    np.testing.assert_array_equal(ds["probe"].values, star["probe"].values)
    for key in ("geometry_nominal", "licence", "energy_eV", "pixel_size_m", "wavelength_m"):
        assert ds.attrs[key] == star.attrs[key]


def _tike_like(path, drop=None, **replace):
    rng = np.random.default_rng(0)
    arrays = {
        "data": rng.poisson(5.0, (1, 6, 16, 16)).astype(np.float32),
        "scan": rng.uniform(-20, 20, (1, 6, 2)).astype(np.float32),
        "probe": (rng.normal(size=(1, 1, 1, 1, 16, 16)) + 0j).astype(np.complex64),
    }
    arrays.update(replace)
    if drop:
        del arrays[drop]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with bz2.open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


@pytest.mark.parametrize("key", ["data", "scan", "probe"])
def test_star_missing_key_is_named(tmp_path, key):
    path = _tike_like(tmp_path / "t.npz.bz2", drop=key)
    with pytest.raises(DatasetError) as e:
        import_siemens_star(path)
    assert e.value.field == key
    assert key in str(e.value)


@pytest.mark.parametrize(
    "replace, field",
    [
        ({"scan": np.zeros((1, 5, 2), np.float32)}, "scan"),
        ({"scan": np.zeros((1, 6, 3), np.float32)}, "scan"),
        ({"probe": np.zeros((1, 1, 1, 1, 16, 8), np.complex64)}, "probe"),
        ({"data": np.zeros((2, 6, 16, 16), np.float32)}, "data"),
        ({"data": np.zeros((16, 16), np.float32)}, "data"),
    ],
)
def test_star_inconsistent_shapes_are_named(tmp_path, replace, field):
    path = _tike_like(tmp_path / "t.npz.bz2", **replace)
    with pytest.raises(DatasetError) as e:
        import_siemens_star(path)
    assert e.value.field == field


def test_star_layout_negative_and_nan_counts_are_reported(tmp_path):
    data = np.full((1, 6, 16, 16), 3.0, np.float32)
    data[0, 0, 0, :4] = -2.0
    data[0, 1, 1, :3] = np.nan
    path = _tike_like(tmp_path / "t.npz.bz2", data=data)
    ds = import_siemens_star(path)
    validate_dataset(ds)
    assert ds.attrs["negative_counts_clipped"] == 4
    assert ds.attrs["nonfinite_counts_zeroed"] == 3
    assert ds["intensity"].values.min() == 0
    assert ds["intensity"].values.sum() == pytest.approx(3.0 * (6 * 256 - 7))


def test_star_layout_probe_in_fft_order_is_centred(tmp_path):
    p = np.zeros((16, 16), np.complex64)
    p[6:10, 6:10] = 1  # a centred blob ...
    path = _tike_like(tmp_path / "t.npz.bz2", probe=np.fft.ifftshift(p).reshape(1, 1, 1, 1, 16, 16))  # ... stored in FFT order
    ds = import_siemens_star(path)
    assert ds.attrs["probe_fftshifted"]
    got = np.abs(ds["probe"].values[0])
    np.testing.assert_array_equal(got > 0, np.abs(p) > 0)


def test_star_missing_or_garbage_file(tmp_path):
    with pytest.raises(DatasetError) as e:
        import_siemens_star(tmp_path / "nothing.npz.bz2")
    assert e.value.field == "file"
    bad = tmp_path / "bad.npz.bz2"
    bad.write_bytes(b"not bzip2 at all")
    with pytest.raises(DatasetError) as e:
        import_siemens_star(bad)
    assert e.value.field == "file"


# --------------------------------------------------------------------------- generic npz


def _synthetic(n_scan=5, n=16, seed=1):
    rng = np.random.default_rng(seed)
    inten = rng.poisson(20.0, (n_scan, n, n)).astype(np.float32)
    pos = rng.uniform(0, 1e-6, (n_scan, 2))
    mask = np.ones((n, n), bool)
    mask[0, :3] = False
    probe = (rng.normal(size=(2, n, n)) + 1j * rng.normal(size=(2, n, n))).astype(np.complex64)
    return inten, pos, mask, probe


def test_npz_round_trip(tmp_path):
    inten, pos, mask, probe = _synthetic()
    path = tmp_path / "d.npz"
    np.savez(path, intensity=inten, position=pos, mask=mask, probe=probe,
             radiation=np.array("xray"), energy_eV=np.array(9e3), pixel_size_m=np.array(12e-9),
             detector_distance_m=np.array(2.5))
    ds = import_npz(path)
    validate_dataset(ds)
    np.testing.assert_array_equal(ds["intensity"].values, inten)
    np.testing.assert_array_equal(ds["position"].values, pos)
    np.testing.assert_array_equal(ds["mask"].values, mask)
    np.testing.assert_array_equal(ds["probe"].values, probe)
    assert ds.attrs["radiation"] == "xray"
    assert ds.attrs["energy_eV"] == 9e3 and ds.attrs["pixel_size_m"] == 12e-9
    assert ds.attrs["wavelength_m"] == pytest.approx(physics.xray_wavelength(9e3), rel=1e-12)
    assert ds.attrs["detector_distance_m"] == 2.5
    out = tmp_path / "d.zarr"
    daskptycho.write_dataset(ds, out)
    back = daskptycho.open_dataset(out)
    np.testing.assert_array_equal(back["intensity"].values, inten)
    np.testing.assert_array_equal(back["position"].values, pos)
    np.testing.assert_array_equal(back["probe"].values, probe)
    assert back.attrs["detector_distance_m"] == 2.5


def test_npz_keywords_fft_order_and_npy(tmp_path):
    inten, pos, mask, _ = _synthetic()
    path = tmp_path / "d.npz"
    np.savez(path, intensity=np.fft.ifftshift(inten, axes=(-2, -1)), position=pos, mask=np.fft.ifftshift(mask),
             energy_eV=np.array(1.0))
    ds = import_npz(path, fft_order=True, radiation="electron", energy_eV=300e3, pixel_size_m=1e-11)
    np.testing.assert_array_equal(ds["intensity"].values, inten)
    np.testing.assert_array_equal(ds["mask"].values, mask)
    assert ds.attrs["energy_eV"] == 300e3  # keywords win over the file
    assert ds.attrs["wavelength_m"] == pytest.approx(physics.electron_wavelength(300e3), rel=1e-12)
    # a .npy holds the intensity; the rest comes as keywords
    npy = tmp_path / "i.npy"
    np.save(npy, inten)
    ds = import_npz(npy, position=pos, radiation="xray", energy_eV=8e3, pixel_size_m=1e-8, wavelength_m=1.5e-10)
    np.testing.assert_array_equal(ds["intensity"].values, inten)
    assert ds.attrs["wavelength_m"] == 1.5e-10
    # bz2-compressed npz
    buf = io.BytesIO()
    np.savez(buf, intensity=inten, position=pos)
    (tmp_path / "d.npz.bz2").write_bytes(bz2.compress(buf.getvalue()))
    ds = import_npz(tmp_path / "d.npz.bz2", radiation="xray", energy_eV=8e3, pixel_size_m=1e-8)
    np.testing.assert_array_equal(ds["intensity"].values, inten)


@pytest.mark.parametrize("drop", ["intensity", "position"])
def test_npz_missing_arrays_are_named(tmp_path, drop):
    inten, pos, _, _ = _synthetic()
    arrays = {"intensity": inten, "position": pos}
    del arrays[drop]
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DatasetError) as e:
        import_npz(tmp_path / "d.npz", radiation="xray", energy_eV=8e3, pixel_size_m=1e-8)
    assert e.value.field == drop
    assert drop in str(e.value)


@pytest.mark.parametrize("drop", ["radiation", "energy_eV", "pixel_size_m"])
def test_npz_missing_attributes_are_named(tmp_path, drop):
    inten, pos, _, _ = _synthetic()
    np.savez(tmp_path / "d.npz", intensity=inten, position=pos)
    kw = {"radiation": "xray", "energy_eV": 8e3, "pixel_size_m": 1e-8}
    del kw[drop]
    with pytest.raises(DatasetError) as e:
        import_npz(tmp_path / "d.npz", **kw)
    assert e.value.field == f"attrs.{drop}"


@pytest.mark.parametrize(
    "arrays, kw, field",
    [
        ({"position": np.zeros((4, 2))}, {}, "position"),               # 5 patterns, 4 positions
        ({"position": np.full((5, 2), 3.0)}, {}, "position"),           # pixels, not metres
        ({"position": np.full((5, 2), np.nan)}, {}, "position"),
        ({"mask": np.ones((8, 8), bool)}, {}, "mask"),
        ({"mask": np.zeros((16, 16), bool)}, {}, "mask"),               # no valid pixel
        ({"probe": np.ones((3, 16, 8), np.complex64)}, {}, "probe"),
        ({"intensity": np.ones((16, 16), np.float32)}, {}, "intensity"),
        ({"extra": np.ones(3)}, {}, "extra"),                            # unknown array
        ({}, {"radiation": "neutron"}, "attrs.radiation"),
        ({}, {"energy_eV": -1.0}, "attrs.energy_eV"),
        ({}, {"pixel_size_m": 0.0}, "attrs.pixel_size_m"),
    ],
)
def test_npz_bad_content_is_named(tmp_path, arrays, kw, field):
    inten, pos, _, _ = _synthetic()
    base = {"intensity": inten, "position": pos}
    base.update(arrays)
    np.savez(tmp_path / "d.npz", **base)
    args = {"radiation": "xray", "energy_eV": 8e3, "pixel_size_m": 1e-8}
    args.update(kw)
    with pytest.raises(DatasetError) as e:
        import_npz(tmp_path / "d.npz", **args)
    assert e.value.field == field


def test_npz_negative_and_nan_counts_are_clipped_and_counted(tmp_path):
    inten, pos, _, _ = _synthetic()
    inten[0, 0, 0] = -1
    inten[1, 2, :2] = np.inf
    np.savez(tmp_path / "d.npz", intensity=inten, position=pos)
    ds = import_npz(tmp_path / "d.npz", radiation="xray", energy_eV=8e3, pixel_size_m=1e-8)
    assert ds.attrs["negative_counts_clipped"] == 1
    assert ds.attrs["nonfinite_counts_zeroed"] == 2
    assert ds["intensity"].values.min() == 0 and np.isfinite(ds["intensity"].values).all()


# --------------------------------------------------------------------------- never unpickle

UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return "pwned"


class _Trap:
    """Unpickling this calls _record_unpickling."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_object_arrays_are_refused_not_loaded(tmp_path):
    inten, pos, _, _ = _synthetic()
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap()
    path = tmp_path / "evil.npz"
    np.savez(path, intensity=inten, position=pos, probe=trap)  # numpy pickles object arrays
    with pytest.raises(DatasetError) as e:
        import_npz(path, radiation="xray", energy_eV=8e3, pixel_size_m=1e-8)
    assert e.value.field == "probe" and "object" in str(e.value)
    # an object array as the intensity of a .npy, and as the data of the Tike layout
    np.save(tmp_path / "evil.npy", trap, allow_pickle=True)
    with pytest.raises(DatasetError):
        import_npz(tmp_path / "evil.npy", position=pos, radiation="xray", energy_eV=8e3, pixel_size_m=1e-8)
    buf = io.BytesIO()
    np.savez(buf, data=trap, scan=np.zeros((1, 6, 2), np.float32), probe=np.zeros((1, 1, 1, 1, 16, 16), np.complex64))
    (tmp_path / "evil.npz.bz2").write_bytes(bz2.compress(buf.getvalue()))
    with pytest.raises(DatasetError) as e:
        import_siemens_star(tmp_path / "evil.npz.bz2")
    assert e.value.field == "data"
    assert UNPICKLED == []
    # a plain pickle is no npz either
    import pickle

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Trap()))
    with pytest.raises(DatasetError) as e:
        import_npz(tmp_path / "evil.pkl", radiation="xray", energy_eV=8e3, pixel_size_m=1e-8)
    assert e.value.field == "file"
    assert UNPICKLED == []
