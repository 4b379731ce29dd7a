"""The simulator: truth on the reconstruction grid, crystal lattice, intensities that
follow from the stored truth, dose and noise, the X-ray image kind, option errors."""

from __future__ import annotations

import numpy as np
import pytest

import daskptycho
from daskptycho import physics
from daskptycho.errors import DaskptychoError, OptionsError
from daskptycho.geometry import object_grid
from daskptycho.io import validate_dataset
from daskptycho.simulate import SimulationOptions

A_PBTIO3 = 3.9e-10


@pytest.fixture(scope="module")
def multi():
    """3 slices, 2 probe modes: the general case of the forward model."""
    return daskptycho.simulate(kind="pbtio3", scan=(2, 3), detector=16, slices=3, probe_modes=2)


@pytest.fixture(scope="module")
def big():
    """A window wide enough (64 px = 10.7 angstrom) to see the 3.9 angstrom lattice."""
    return daskptycho.simulate(kind="pbtio3", scan=(4, 4), detector=64, slices=3)


def _my_multislice_intensity(ds):
    """Diffraction intensities from the stored truth, written here from scratch:
    windows found from the object's y/x coordinates, numpy FFTs, Fresnel kernel
    exp(-i pi lambda dz |k|^2), orthonormal FFT to the far field, modes added
    incoherently, zero frequency moved to the centre."""
    obj = ds["truth_object"].values.astype(np.complex128)
    probe = ds["truth_probe"].values.astype(np.complex128)
    pos = ds["position"].values
    y, x = ds["y"].values, ds["x"].values
    dx = ds.attrs["pixel_size_m"]
    lam = ds.attrs["wavelength_m"]
    dz = ds.attrs["slice_thickness_m"]
    n = probe.shape[-1]
    k = np.fft.fftfreq(n, dx)
    h = np.exp(-1j * np.pi * lam * dz * (k[:, None] ** 2 + k[None, :] ** 2))
    out = np.zeros((pos.shape[0], n, n))
    for j, (py, px) in enumerate(pos):
        r = int(np.argmin(np.abs(y - py))) - n // 2
        c = int(np.argmin(np.abs(x - px))) - n // 2
        assert r >= 0 and c >= 0 and r + n <= y.size and c + n <= x.size
        for mode in probe:
            psi = mode
            for s in range(obj.shape[0]):
                psi = psi * obj[s, r:r + n, c:c + n]
                if s < obj.shape[0] - 1:
                    psi = np.fft.ifft2(np.fft.fft2(psi) * h)
            out[j] += np.abs(np.fft.fft2(psi, norm="ortho")) ** 2
    return np.fft.fftshift(out, axes=(-2, -1))


# --------------------------------------------------------------------------- geometry


def test_truth_lies_on_the_reconstruction_grid(multi):
    ds = multi
    validate_dataset(ds)
    dx = ds.attrs["pixel_size_m"]
    lam = physics.electron_wavelength(200e3)
    assert ds.attrs["radiation"] == "electron"
    assert ds.attrs["wavelength_m"] == pytest.approx(lam, rel=1e-12)
    # detector half-angle 75 mrad by default: dx = lambda / (2 theta_max)
    assert dx == pytest.approx(lam / (2 * 75e-3), rel=1e-12)
    # reciprocal coordinates: spacing 1 / (N dx), zero frequency at N // 2
    ky = ds["ky"].values
    np.testing.assert_allclose(np.diff(ky), 1 / (16 * dx), rtol=1e-10)
    assert ky[8] == 0

    pos = ds["position"].values
    assert pos.shape == (6, 2)
    # nominal 0.5 angstrom steps, snapped to the pixel lattice, row-major scan
    iy, ix = np.divmod(np.arange(6), 3)
    np.testing.assert_allclose(pos[:, 0], np.rint(iy * 0.5e-10 / dx) * dx, rtol=0, atol=1e-9 * dx)
    np.testing.assert_allclose(pos[:, 1], np.rint(ix * 0.5e-10 / dx) * dx, rtol=0, atol=1e-9 * dx)

    grid = object_grid(pos, (16, 16), dx, 0)
    assert ds["truth_object"].shape == (3,) + grid.shape
    np.testing.assert_allclose(ds["y"].values, grid.y, rtol=0, atol=1e-6 * dx)
    np.testing.assert_allclose(ds["x"].values, grid.x, rtol=0, atol=1e-6 * dx)
    # positions fall on pixel centres and every window fits: the grid is the smallest
    # one holding all windows (first window starts at pixel 0, last ends at the edge)
    for coord, p in ((ds["y"].values, pos[:, 0]), (ds["x"].values, pos[:, 1])):
        i = (p - coord[0]) / dx
        np.testing.assert_allclose(i, np.rint(i), atol=1e-6)
        assert np.rint(i).min() - 8 == 0
        assert np.rint(i).max() - 8 + 16 == coord.size
    assert ds["truth_probe"].shape == (2, 16, 16)


def test_pbtio3_lattice_spacing(big):
    """The projected phase repeats every 3.9 angstrom along both axes: the autocorrelation
    peak away from the origin lies at a / dx pixels, +- 1."""
    dx = big.attrs["pixel_size_m"]
    phase = np.angle(big["truth_object"].values.astype(np.complex128)).sum(axis=0)
    assert phase.max() > 0.3  # Pb columns, ~0.35 rad per slice
    f = phase - phase.mean()
    h, w = f.shape
    ac = np.fft.ifft2(np.abs(np.fft.fft2(f, s=(2 * h, 2 * w))) ** 2).real
    overlap = np.fft.ifft2(np.abs(np.fft.fft2(np.ones_like(f), s=(2 * h, 2 * w))) ** 2).real
    ac = ac / np.maximum(np.rint(overlap), 1)
    expect = A_PBTIO3 / dx  # 23.3 pixels
    lo, hi = 8, int(1.6 * expect)  # beyond the central peak, before the second order
    assert hi < min(h, w) - 20  # enough overlap at the largest shift
    peak_y = lo + np.argmax(ac[lo:hi, 0])
    peak_x = lo + np.argmax(ac[0, lo:hi])
    assert abs(peak_y - expect) <= 1
    assert abs(peak_x - expect) <= 1
    assert ac[int(round(expect)), 0] > 0.7 * ac[0, 0]  # a strong, genuine period


def test_pbtio3_slices_differ_but_share_the_lattice(multi):
    obj = multi["truth_object"].values
    assert not np.allclose(obj[0], obj[1])  # independent thermal displacements
    phase = np.angle(obj)
    corr = np.corrcoef(phase[0].ravel(), phase[1].ravel())[0, 1]
    assert corr > 0.8  # same columns, jiggled by ~0.06 angstrom
    # weak absorption: |O| = exp(-0.03 phase) <= 1
    assert np.abs(obj).max() <= 1 + 1e-6
    assert np.abs(obj).min() > 0.95


# --------------------------------------------------------------------------- intensities


def test_intensities_follow_from_the_stored_truth(multi):
    inten = multi["intensity"].values
    assert inten.dtype == np.float32 and inten.shape == (6, 16, 16)
    mine = _my_multislice_intensity(multi)
    np.testing.assert_allclose(inten, mine, rtol=1e-4, atol=1e-5 * mine.max())
    # and the package's own forward model, fed with the package's geometry, agrees
    dx = multi.attrs["pixel_size_m"]
    grid = object_grid(multi["position"].values, (16, 16), dx, 0)
    index = physics.window_index(grid.window_corners(multi["position"].values, (16, 16)), (16, 16), grid.shape)
    kernel = physics.fresnel_kernel((16, 16), dx, multi.attrs["wavelength_m"], multi.attrs["slice_thickness_m"], dtype=np.complex128)
    pkg = physics.far_field_intensity(multi["truth_object"].values.astype(np.complex128),
                                      multi["truth_probe"].values.astype(np.complex128), index, kernel)
    np.testing.assert_allclose(pkg, mine, rtol=1e-10, atol=1e-12 * mine.max())


def test_intensities_big_window(big):
    mine = _my_multislice_intensity(big)
    np.testing.assert_allclose(big["intensity"].values, mine, rtol=1e-4, atol=1e-5 * mine.max())
    # the bright-field disc (25 of 75 mrad: radius 32/3 px) is centred on pixel N // 2
    mean = big["intensity"].values.astype(np.float64).mean(axis=0)
    c = np.arange(64) - 32
    r = np.hypot(c[:, None], c[None, :])
    assert mean[r <= 32 / 3 + 1].sum() > 0.8 * mean.sum()
    cy = np.sum(mean * c[:, None]) / mean.sum()
    cx = np.sum(mean * c[None, :]) / mean.sum()
    assert abs(cy) < 1 and abs(cx) < 1


@pytest.mark.parametrize("counts", [1e6, 123.0])
def test_counts_per_pattern(counts):
    ds = daskptycho.simulate(kind="pbtio3", scan=(2, 2), detector=16, slices=2, probe_modes=2, counts_per_pattern=counts)
    probe = ds["truth_probe"].values.astype(np.complex128)
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(counts, rel=1e-5)
    total = ds["intensity"].values.astype(np.float64).sum(axis=(1, 2))
    # weakly absorbing object: a few % lost at most, never gained
    assert np.all(total <= counts * (1 + 1e-5))
    assert np.all(total >= 0.97 * counts)
    assert ds["intensity"].values.min() >= 0


def test_dose_gives_poisson_counts():
    dose = 1e5  # per square angstrom; 0.5 angstrom steps -> 25000 per pattern
    noisy = daskptycho.simulate(kind="pbtio3", scan=(4, 4), detector=16, slices=2, dose=dose)
    clean = daskptycho.simulate(kind="pbtio3", scan=(4, 4), detector=16, slices=2, counts_per_pattern=dose * 0.5**2)
    validate_dataset(noisy)
    n = noisy["intensity"].values
    assert n.dtype == np.float32
    assert np.all(n >= 0) and np.array_equal(n, np.round(n))  # integer counts
    # the same truth (the noise is drawn after it) and the expectation is the clean pattern
    np.testing.assert_array_equal(noisy["truth_object"].values, clean["truth_object"].values)
    lam = clean["intensity"].values.astype(np.float64)
    assert not np.array_equal(n, lam)
    assert n.sum() == pytest.approx(lam.sum(), abs=5 * np.sqrt(lam.sum()))
    per_pattern = n.sum(axis=(1, 2))
    assert np.all(np.abs(per_pattern - lam.sum(axis=(1, 2))) < 6 * np.sqrt(lam.sum(axis=(1, 2))))
    # Poisson: variance equals mean (reduced chi-square ~ 1 on pixels with a few counts)
    m = lam > 2
    assert m.sum() > 200
    chi2 = np.mean((n[m] - lam[m]) ** 2 / lam[m])
    assert 0.8 < chi2 < 1.2
    # dark pixels stay (nearly) dark: zero-mean noise can't make counts out of nothing
    assert np.all(n[lam < 1e-6] == 0)


def test_seed_makes_simulations_reproducible():
    a = daskptycho.simulate(kind="pbtio3", scan=(2, 2), detector=16, slices=2, dose=1e4, seed=3)
    b = daskptycho.simulate(kind="pbtio3", scan=(2, 2), detector=16, slices=2, dose=1e4, seed=3)
    c = daskptycho.simulate(kind="pbtio3", scan=(2, 2), detector=16, slices=2, dose=1e4, seed=4)
    np.testing.assert_array_equal(a["intensity"].values, b["intensity"].values)
    np.testing.assert_array_equal(a["truth_object"].values, b["truth_object"].values)
    assert not np.array_equal(a["truth_object"].values, c["truth_object"].values)


# --------------------------------------------------------------------------- image kind


@pytest.fixture(scope="module")
def image1():
    return daskptycho.simulate(kind="image", scan=(3, 3), detector=32, slices=1)


def test_image_kind_xray_single_slice(image1):
    ds = image1
    validate_dataset(ds)
    assert ds.attrs["radiation"] == "xray"
    assert ds.attrs["energy_eV"] == 8e3
    lam = physics.xray_wavelength(8e3)
    assert ds.attrs["wavelength_m"] == pytest.approx(lam, rel=1e-12)
    assert ds.attrs["pixel_size_m"] == pytest.approx(lam / (2 * 7.75e-3), rel=1e-12)
    assert ds["truth_object"].shape[0] == 1
    grid = object_grid(ds["position"].values, (32, 32), ds.attrs["pixel_size_m"], 0)
    assert ds["truth_object"].shape[1:] == grid.shape
    np.testing.assert_allclose(ds["y"].values, grid.y, atol=1e-6 * grid.pixel_size_m)
    obj = ds["truth_object"].values
    assert np.abs(obj).max() <= 1 + 1e-6 and np.abs(obj).min() < 0.8  # absorbing star
    mine = _my_multislice_intensity(ds)
    np.testing.assert_allclose(ds["intensity"].values, mine, rtol=1e-4, atol=1e-5 * mine.max())


def test_image_kind_slices_split_the_object(image1):
    two = daskptycho.simulate(kind="image", scan=(3, 3), detector=32, slices=2)
    assert two["truth_object"].shape[0] == 2
    # the projected transmission is split evenly: the product of the slices is the 1-slice object
    np.testing.assert_allclose(two["truth_object"].values.prod(axis=0), image1["truth_object"].values[0], atol=1e-5)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kw, option",
    [
        ({"scan": (0, 4)}, "scan"),
        ({"scan": -1}, "scan"),
        ({"detector": 7}, "detector"),
        ({"detector": 6}, "detector"),
        ({"kind": "bogus"}, "kind"),
        ({"slices": 0}, "slices"),
        ({"energy_eV": -1.0}, "energy_eV"),
        ({"step_m": 0.0}, "step_m"),
        ({"counts_per_pattern": float("nan")}, "counts_per_pattern"),
        ({"dose": 0.0}, "dose"),
        ({"semiangle_rad": 0.1}, "semiangle_rad"),  # beyond the 75 mrad detector
        ({"detectr": 16}, "detectr"),
        ({"bogus_key": 1}, "bogus_key"),
    ],
)
def test_bad_options_name_the_option(kw, option):
    with pytest.raises(OptionsError) as e:
        daskptycho.simulate(**kw)
    assert e.value.option == option
    assert isinstance(e.value, DaskptychoError) and isinstance(e.value, ValueError)
    assert repr(option) in str(e.value)


def test_unknown_option_suggests_the_close_one():
    with pytest.raises(OptionsError) as e:
        daskptycho.simulate({"detectr": 16})
    assert "detector" in e.value.problem
    with pytest.raises(OptionsError) as e:
        daskptycho.simulate(options=42)
    assert e.value.option == "options"


def test_options_from_dict_dataclass_and_keywords_agree():
    base = daskptycho.simulate(kind="pbtio3", scan=(2, 2), detector=16, slices=2)
    from_dict = daskptycho.simulate({"kind": "pbtio3", "scan": (2, 2), "detector": 32}, detector=16, slices=2)
    from_obj = daskptycho.simulate(SimulationOptions(scan=(2, 2), detector=16, slices=2))
    for other in (from_dict, from_obj):
        np.testing.assert_array_equal(other["intensity"].values, base["intensity"].values)
    # a scalar scan means a square scan
    sq = daskptycho.simulate(scan=2, detector=16, slices=2)
    np.testing.assert_array_equal(sq["position"].values, base["position"].values)
