"""The fly-scan simulation: the sample moves along x during each exposure, and each
pattern is the incoherent mean of the patterns of whole-pixel sub-positions."""

from __future__ import annotations

import numpy as np
import pytest

import daskptycho
from daskptycho import physics
from daskptycho.errors import OptionsError
from daskptycho.geometry import object_grid
from daskptycho.io import validate_dataset
from daskptycho.simulate import SimulationOptions, flyscan_offsets

SMALL = dict(kind="flyscan", scan=(3, 4), detector=64)


@pytest.fixture(scope="module")
def clean():
    """Noise-free, default motion: 10 px steps, 5 sub-positions."""
    return daskptycho.simulate(**SMALL, dose=None)


@pytest.fixture(scope="module")
def jittered():
    """Noise-free, 7 px steps, 4 sub-positions, positions off the pixel lattice, 2 modes."""
    return daskptycho.simulate(**SMALL, dose=None, step_m=70e-9, flyscan_subpositions=4,
                               jitter_m=3e-9, probe_modes=2, seed=5)


def _window_at(y, x, py, px, n):
    """Top-left pixel of the n x n window centred (pixel n // 2) on the pixel nearest (py, px)."""
    r = int(np.argmin(np.abs(y - py))) - n // 2
    c = int(np.argmin(np.abs(x - px))) - n // 2
    assert r >= 0 and c >= 0 and r + n <= y.size and c + n <= x.size, "a sub-position window leaves the truth"
    return r, c


def _static(ds, offset_px):
    """Coherent single-slice far-field intensities at position + (0, offset_px * dx), from the
    stored truth, written from scratch: windows found by coordinates, orthonormal numpy FFT,
    modes added in intensity, zero frequency moved to the centre."""
    obj = ds["truth_object"].values.astype(np.complex128)
    assert obj.shape[0] == 1
    obj = obj[0]
    probe = ds["truth_probe"].values.astype(np.complex128)
    y, x = ds["y"].values, ds["x"].values
    dx = ds.attrs["pixel_size_m"]
    n = probe.shape[-1]
    out = np.zeros((ds.sizes["scan"], n, n))
    for j, (py, px) in enumerate(ds["position"].values):
        r, c = _window_at(y, x, py, px + offset_px * dx, n)
        for mode in probe:
            out[j] += np.abs(np.fft.fft2(mode * obj[r:r + n, c:c + n], norm="ortho")) ** 2
    return np.fft.fftshift(out, axes=(-2, -1))


def _my_flyscan(ds):
    offsets = ds.attrs["flyscan_offsets_px"]
    return sum(_static(ds, o) for o in offsets) / len(offsets)


# --------------------------------------------------------------------------- motion model


@pytest.mark.parametrize(
    "step_px, n, expect",
    [
        (10, 5, [-4, -2, 0, 2, 4]),
        (8, 4, [-3, -1, 1, 3]),       # midpoints -3, -1, 1, 3 exactly
        (4, 4, [-2, -1, 1, 2]),       # -1.5, -.5, .5, 1.5 rounded half away from zero
        (7, 4, [-3, -1, 1, 3]),       # -2.625, -0.875, 0.875, 2.625
        (10, 1, [0]),                 # no motion: the static scan
        (2, 5, [-1, 0, 0, 0, 1]),     # more sub-positions than pixels: offsets coincide
    ],
)
def test_flyscan_offsets(step_px, n, expect):
    off = flyscan_offsets(step_px, n)
    assert off.dtype == np.int64
    assert off.tolist() == expect
    np.testing.assert_array_equal(off, -off[::-1])  # symmetric about the nominal position
    assert np.all(np.abs(off) <= step_px / 2)       # within one step


def test_defaults_are_a_noisy_xray_flyscan():
    ds = daskptycho.simulate(kind="flyscan")
    validate_dataset(ds)
    opts = SimulationOptions(kind="flyscan")
    assert opts.flyscan_subpositions == 5 and opts.dose == 0.5 and opts.slices == 1
    assert ds.attrs["radiation"] == "xray" and ds.attrs["energy_eV"] == 8e3
    assert ds["intensity"].shape == (256, 64, 64)
    assert ds["truth_object"].shape[0] == 1 and ds["truth_probe"].shape == (1, 64, 64)
    dx = ds.attrs["pixel_size_m"]
    assert int(np.rint(100e-9 / dx)) == 10
    assert ds.attrs["flyscan_subpositions"] == 5
    assert list(ds.attrs["flyscan_offsets_px"]) == [-4, -2, 0, 2, 4]
    assert ds.attrs["flyscan_axis"] == "x"
    assert ds.attrs["recommended_pad_px"] == 4
    # noisy by default: integer counts, ~5e5 per pattern (0.5 photons/A^2 over a 100 nm step)
    inten = ds["intensity"].values
    assert np.array_equal(inten, np.round(inten)) and inten.min() >= 0
    assert np.sum(np.abs(ds["truth_probe"].values.astype(np.complex128)) ** 2) == pytest.approx(5e5, rel=1e-5)
    totals = inten.sum(axis=(1, 2))
    assert 1e5 < totals.mean() < 1e6
    # the stored positions are the nominal ones (centres of the motion), on the lattice
    pos = ds["position"].values
    iy, ix = np.divmod(np.arange(256), 16)
    np.testing.assert_allclose(pos[:, 0], iy * 10 * dx, atol=1e-9 * dx)
    np.testing.assert_allclose(pos[:, 1], ix * 10 * dx, atol=1e-9 * dx)


def test_truth_lies_on_the_grid_reconstruct_builds_with_the_recommended_pad(clean):
    from daskptycho.engines import engine_options
    from daskptycho.engines.problem import prepare

    ds = clean
    validate_dataset(ds)
    pad = ds.attrs["recommended_pad_px"]
    dx = ds.attrs["pixel_size_m"]
    pos = ds["position"].values
    grid = object_grid(pos, (64, 64), dx, pad)
    assert ds["truth_object"].shape == (1,) + grid.shape
    np.testing.assert_allclose(ds["y"].values, grid.y, rtol=0, atol=1e-6 * dx)
    np.testing.assert_allclose(ds["x"].values, grid.x, rtol=0, atol=1e-6 * dx)
    problem = prepare(ds, engine_options(engine="ml", pad_px=pad))
    np.testing.assert_allclose(problem.grid.y, ds["y"].values, rtol=0, atol=1e-6 * dx)
    np.testing.assert_allclose(problem.grid.x, ds["x"].values, rtol=0, atol=1e-6 * dx)
    # the pad is needed: without it the outermost sub-position windows leave the grid
    bare = object_grid(pos, (64, 64), dx, 0)
    with pytest.raises(ValueError):
        physics.window_index(bare.window_corners(pos + [0, pad * dx], (64, 64)), (64, 64), bare.shape)


# --------------------------------------------------------------------------- intensities


@pytest.mark.parametrize("name", ["clean", "jittered"])
def test_intensities_are_the_incoherent_mean_over_subpositions(name, request):
    ds = request.getfixturevalue(name)
    validate_dataset(ds)
    inten = ds["intensity"].values
    assert inten.dtype == np.float32
    mine = _my_flyscan(ds)
    np.testing.assert_allclose(inten, mine, rtol=1e-4, atol=1e-5 * mine.max())
    if name == "jittered":
        assert list(ds.attrs["flyscan_offsets_px"]) == [-3, -1, 1, 3]
        assert ds["truth_probe"].shape[0] == 2


def test_one_subposition_is_the_static_model():
    common = dict(scan=(3, 4), detector=64, step_m=100e-9, slices=1, slice_thickness_m=1e-6, energy_eV=8e3,
                  semiangle_rad=2.5e-3, defocus_m=48e-6, max_angle_rad=7.75e-3, dose=None, seed=2)
    fly = daskptycho.simulate(kind="flyscan", flyscan_subpositions=1, **common)
    static = daskptycho.simulate(kind="image", **common)
    assert list(fly.attrs["flyscan_offsets_px"]) == [0] and fly.attrs["recommended_pad_px"] == 0
    np.testing.assert_array_equal(fly["truth_object"].values, static["truth_object"].values)
    np.testing.assert_array_equal(fly["y"].values, static["y"].values)
    np.testing.assert_array_equal(fly["intensity"].values, static["intensity"].values)


def test_the_motion_blur_is_real(clean):
    """The fly-scan patterns differ from the static patterns of the same object and probe at
    the nominal positions (and from those of any one sub-position)."""
    fly = clean["intensity"].values.astype(np.float64)
    for off in clean.attrs["flyscan_offsets_px"]:
        static = _static(clean, off)
        rel = np.linalg.norm(fly - static) / np.linalg.norm(static)
        assert rel > 0.05, (off, rel)
    # the incoherent sum washes out speckle: the patterns are smoother than static ones
    static0 = _static(clean, 0)
    dx_fly = np.abs(np.diff(fly, axis=-1)).sum() / fly.sum()
    dx_static = np.abs(np.diff(static0, axis=-1)).sum() / static0.sum()
    assert dx_fly < dx_static


def test_total_counts_are_conserved(clean):
    """sum |P|^2 = counts_per_pattern; a pattern's total is the mean over sub-positions of the
    power transmitted through the object (Parseval), so at most counts_per_pattern and the
    same, on average, as a static scan's."""
    counts = SimulationOptions(kind="flyscan").counts_per_pattern
    probe = clean["truth_probe"].values.astype(np.complex128)
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(counts, rel=1e-5)
    obj = clean["truth_object"].values[0].astype(np.complex128)
    y, x = clean["y"].values, clean["x"].values
    dx = clean.attrs["pixel_size_m"]
    offsets = clean.attrs["flyscan_offsets_px"]
    expect = np.zeros(clean.sizes["scan"])
    for j, (py, px) in enumerate(clean["position"].values):
        for o in offsets:
            r, c = _window_at(y, x, py, px + o * dx, 64)
            expect[j] += np.sum(np.abs(probe * obj[r:r + 64, c:c + 64]) ** 2) / len(offsets)
    totals = clean["intensity"].values.astype(np.float64).sum(axis=(1, 2))
    np.testing.assert_allclose(totals, expect, rtol=1e-4)
    assert np.all(totals <= counts * (1 + 1e-5))
    assert np.all(totals >= 0.5 * counts)  # |O| >= 0.75 everywhere
    static = daskptycho.simulate(**SMALL, dose=None, flyscan_subpositions=1)
    static_totals = static["intensity"].values.astype(np.float64).sum(axis=(1, 2))
    assert totals.mean() == pytest.approx(static_totals.mean(), rel=0.03)


def test_dose_gives_poisson_counts_around_the_clean_mean(clean):
    dose = 0.5  # photons per square angstrom; 100 nm steps -> 5e5 per pattern
    noisy = daskptycho.simulate(**SMALL, dose=dose)
    ref = daskptycho.simulate(**SMALL, dose=None, counts_per_pattern=dose * 1000.0**2)
    validate_dataset(noisy)
    np.testing.assert_array_equal(noisy["truth_object"].values, ref["truth_object"].values)
    np.testing.assert_allclose(ref["intensity"].values, clean["intensity"].values * 0.5, rtol=1e-5,
                               atol=1e-6 * clean["intensity"].values.max())
    n = noisy["intensity"].values
    assert n.dtype == np.float32
    assert np.all(n >= 0) and np.array_equal(n, np.round(n))
    lam = ref["intensity"].values.astype(np.float64)
    assert not np.array_equal(n, lam)
    assert n.sum() == pytest.approx(lam.sum(), abs=5 * np.sqrt(lam.sum()))
    per_pattern = n.sum(axis=(1, 2))
    assert np.all(np.abs(per_pattern - lam.sum(axis=(1, 2))) < 6 * np.sqrt(lam.sum(axis=(1, 2))))
    m = lam > 2
    assert m.sum() > 500
    chi2 = np.mean((n[m] - lam[m]) ** 2 / lam[m])
    assert 0.85 < chi2 < 1.15


def test_seed_reproduces_the_noise():
    a = daskptycho.simulate(kind="flyscan", scan=(2, 2), detector=32, seed=1)
    b = daskptycho.simulate(kind="flyscan", scan=(2, 2), detector=32, seed=1)
    c = daskptycho.simulate(kind="flyscan", scan=(2, 2), detector=32, seed=2)
    np.testing.assert_array_equal(a["intensity"].values, b["intensity"].values)
    assert not np.array_equal(a["intensity"].values, c["intensity"].values)


def test_writes_and_reopens(tmp_path, clean):
    path = tmp_path / "fly.zarr"
    daskptycho.write_dataset(clean, path)
    ds = daskptycho.open_dataset(path)
    assert list(ds.attrs["flyscan_offsets_px"]) == [-4, -2, 0, 2, 4]
    assert ds.attrs["recommended_pad_px"] == 4
    np.testing.assert_array_equal(ds["intensity"].values, clean["intensity"].values)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kw, option",
    [
        ({"kind": "flyscan", "flyscan_subpositions": 0}, "flyscan_subpositions"),
        ({"kind": "flyscan", "flyscan_subpositions": 2.5}, "flyscan_subpositions"),
        ({"kind": "flyscan", "flyscan_subpositions": True}, "flyscan_subpositions"),
        ({"kind": "image", "flyscan_subpositions": 3}, "flyscan_subpositions"),
        ({"kind": "flyscan", "dose": 0.0}, "dose"),
        ({"kind": "flyscan", "dose": "lots"}, "dose"),
        ({"kind": "flyscn"}, "kind"),
        ({"kind": "flyscan", "flyscan_subposition": 3}, "flyscan_subposition"),
    ],
)
def test_bad_flyscan_options_name_the_option(kw, option):
    with pytest.raises(OptionsError) as e:
        daskptycho.simulate(**kw)
    assert e.value.option == option


def test_other_kinds_keep_their_noise_free_default():
    assert SimulationOptions(kind="image").dose is None
    assert SimulationOptions(kind="pbtio3").dose is None
    assert SimulationOptions(kind="image").flyscan_subpositions is None
    # options round-trip through a dict and through the dataclass unchanged
    opts = SimulationOptions(kind="flyscan", dose=None)
    from daskptycho.options import check_options

    again = check_options(SimulationOptions, opts)
    assert again.dose is None and again.flyscan_subpositions == 5
