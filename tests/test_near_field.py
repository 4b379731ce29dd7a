"""Near-field (Fresnel) ptychography: the detector propagation and its adjoint, gradients,
the engines on simulated near-field data with known truth, and the PETRA III P25 data."""

from __future__ import annotations

import os

import dask
import numpy as np
import pytest

import daskptycho as dp
from daskptycho import physics
from daskptycho.engines import engine_options
from daskptycho.engines.ml import run_ml
from daskptycho.engines.problem import prepare
from daskptycho.errors import DatasetError, OptionsError
from daskptycho.io.patterns import load_patterns
from daskptycho.metrics import phase_correlation
from daskptycho.physics import multislice
from daskptycho.physics.propagation import detector_kernel, fresnel_kernel, propagators, split_propagators

PETRA = "/work/shared/data/PETRAIII_P25_Near_Field_Ptycho.cxi"
PETRA_SOURCE_DISTANCE_M = 3.65e-3  # focus-sample distance of the P25 setup (not in the file)


def _crandn(rng, shape):
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


@pytest.fixture(scope="module")
def near_ds():
    """A noise-free near-field simulation (6x6 positions, 32 px frames) with its probe stored."""
    ds = dp.simulate(kind="image", geometry="near-field", detector=32, scan=(6, 6), dose=None)
    ds["probe"] = ds["truth_probe"]
    return ds


@pytest.fixture
def small_problem():
    rng = np.random.default_rng(1)
    n = 16
    det = detector_kernel((n, n), 1e-7, 1e-10, 2e-3)
    obj = np.exp(0.3j * rng.normal(size=(2, 24, 24))).astype(np.complex64)
    probe = _crandn(rng, (2, n, n))
    win = multislice.windows(np.array([[0, 0], [3, 5], [8, 8]]), (n, n), (24, 24))
    return rng, obj, probe, win, fresnel_kernel((n, n), 1e-7, 1e-10, 1e-6), det


def test_detector_kernel_is_the_fresnel_propagation_of_the_centred_frame():
    rng = np.random.default_rng(0)
    for shape in ((16, 16), (15, 12)):
        x = _crandn(rng, shape).astype(np.complex128)
        h = fresnel_kernel(shape, 1e-7, 1e-10, 2e-3, dtype=np.complex128)
        hd = detector_kernel(shape, 1e-7, 1e-10, 2e-3, dtype=np.complex128)
        np.testing.assert_allclose(np.fft.ifft2(hd * np.fft.fft2(x)), np.fft.ifftshift(np.fft.ifft2(h * np.fft.fft2(x))),
                                   atol=1e-10)
        np.testing.assert_allclose(np.abs(hd), 1, atol=1e-12)  # unitary


def test_propagators_split_back():
    k, d = np.ones((4, 4), np.complex64), np.full((4, 4), 1j, np.complex64)
    assert split_propagators(k)[1] is None and split_propagators(None) == (None, None)
    s, det = split_propagators(propagators(k, d))
    np.testing.assert_array_equal(s, k)
    np.testing.assert_array_equal(det, d)
    with pytest.raises(ValueError, match="kernel must be"):
        split_propagators(np.ones((3, 4, 4)))


def test_detector_operator_adjoint_identity():
    """<D x, y> = <x, D^H y> for D = IFFT(H_d FFT(.)), as forward and backward apply it."""
    rng = np.random.default_rng(2)
    det = detector_kernel((16, 16), 1e-7, 1e-10, 2e-3)
    x, y = _crandn(rng, (3, 2, 16, 16)), _crandn(rng, (3, 2, 16, 16))
    dx = multislice._to_detector(x.copy(), det, np, True)
    dhy = multislice._from_detector(y, det, np, True, overwrite=False)
    lhs, rhs = np.vdot(y, dx), np.vdot(dhy, x)
    assert abs(lhs - rhs) < 1e-5 * abs(lhs), (lhs, rhs)
    assert np.isclose(np.linalg.norm(dx), np.linalg.norm(x), rtol=1e-5)  # and unitary


@pytest.mark.parametrize("slices", [1, 2])
def test_near_field_model_adjoint_in_the_probe(small_problem, slices):
    """The whole model is linear in the probe: <F p, y> = <p, F^H y> through forward and backward."""
    rng, obj, probe, win, k, det = small_problem
    obj = obj[:slices]
    kern = propagators(k, det)
    far, cache = multislice.forward(obj, probe, win, kern, keep=True)
    y = _crandn(rng, far.shape)
    g = multislice.backward(y.copy(), cache, win, obj.shape, kern)
    lhs, rhs = np.vdot(far, y), np.vdot(probe, g["probe"])
    assert abs(lhs - rhs) < 1e-4 * abs(lhs), (lhs, rhs)


@pytest.mark.parametrize("kernels", ["numpy", "auto"])
@pytest.mark.parametrize("cost", ["amplitude", "poisson"])
def test_near_field_gradient_finite_difference(small_problem, kernels, cost):
    rng, obj, probe, win, k, det = small_problem
    kern = propagators(k, det)
    intensity = (np.abs(multislice.forward(obj * np.float32(1.05), probe, win, kern)) ** 2).sum(axis=1).astype(np.float32)
    with dask.config.set({"daskptycho.kernels": kernels}):
        g = multislice.gradients(obj, probe, win, kern, intensity, cost=cost)
        for name, base, grad in (("object", obj, g["object"]), ("probe", probe, g["probe"])):
            d = _crandn(rng, base.shape) * np.float32(1e-3)

            def cost_at(v, name=name):
                o, p = (v, probe) if name == "object" else (obj, v)
                return multislice.gradients(o, p, win, kern, intensity, cost=cost)["cost"]

            fd = (cost_at(base + d) - cost_at(base - d)) / 2
            lin = float(np.real(np.vdot(grad, d)))
            assert abs(fd - lin) < 2e-3 * max(abs(fd), 1e-3 * abs(g["cost"])), (name, fd, lin)


def test_compiled_kernels_match_numpy_near_field(small_problem):
    _, obj, probe, win, k, det = small_problem
    kern = propagators(k, det)
    intensity = (np.abs(multislice.forward(obj * np.float32(0.9), probe, win, kern)) ** 2).sum(axis=1).astype(np.float32)
    with dask.config.set({"daskptycho.kernels": "numpy"}):
        ref = multislice.gradients(obj, probe, win, kern, intensity)
    with dask.config.set({"daskptycho.kernels": "auto"}):
        got = multislice.gradients(obj, probe, win, kern, intensity)
    assert np.isclose(got["cost"], ref["cost"], rtol=1e-5)
    for name in ("object", "probe", "illumination", "probe_illumination"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4 * np.abs(ref[name]).max())


def test_simulated_near_field_frames_are_the_model(near_ds):
    ds = near_ds
    assert ds.attrs["geometry"] == "near-field" and np.isclose(ds.attrs["fresnel_number_pixel"], 0.1)
    problem = prepare(ds, engine_options(engine="ml"))
    assert problem.geometry == "near-field" and problem.kernel.shape == (2, 32, 32)
    win = physics.windows(problem.corners, problem.window, problem.grid.shape)
    data = np.fft.ifftshift(ds["intensity"].values, axes=(-2, -1))
    truth = physics.gradients(ds["truth_object"].values, ds["truth_probe"].values, win, problem.kernel, data)["cost"]
    start = physics.gradients(problem.initial_object(), problem.probe, win, problem.kernel, data)["cost"]
    assert truth < 1e-9 * start


def test_ml_reconstructs_a_simulated_near_field_object(near_ds, client):
    ds = near_ds
    res = dp.reconstruct(ds, engine="ml", iterations=100, batch_size=None, client=client)
    assert res.attrs["geometry"] == "near-field"
    cost = res.cost.values
    assert cost[-1] < 0.005 * cost[0]
    r, _ = phase_correlation(res.object, ds.truth_object, ds.position.values)
    assert r > 0.75, r  # the phase's lowest frequencies converge slowest (weak contrast at Fresnel number 0.1)
    o, t = res.object.values[0, 8:-8, 8:-8], ds.truth_object.values[0, 8:-8, 8:-8]
    assert abs(np.vdot(o, t)) / (np.linalg.norm(o) * np.linalg.norm(t)) > 0.97


def test_near_field_probe_guess_turns_probe_refinement_on(near_ds):
    ds = near_ds.drop_vars("probe")
    problem = prepare(ds, engine_options(engine="ml", iterations=30, batch_size=None, refine_probe=False))
    assert problem.options.refine_probe
    # the guess: the mean frame propagated back, with the frames' mean power
    assert np.isclose(np.sum(np.abs(problem.probe) ** 2), problem.mean_counts, rtol=1e-3)
    obj, probe, cost = run_ml(problem, load_patterns(ds))
    assert cost[-1] < 0.1 * cost[0]
    # a stored probe keeps the caller's choice
    assert not prepare(near_ds, engine_options(engine="ml", refine_probe=False)).options.refine_probe


def test_gd_equals_ml_near_field_with_whole_window_halos(near_ds, client):
    ds = near_ds
    kw = dict(iterations=4, refine_probe=True, probe_refine_start=1, batch_size=None)
    problem = prepare(ds, engine_options(engine="ml", **kw))
    ref_obj, ref_probe, ref_cost = run_ml(problem, load_patterns(ds))
    assert prepare(ds, engine_options(engine="gd", tiles=(2, 2))).options.halo == "window"  # chosen, not refused
    res = dp.reconstruct(ds, engine="gd", tiles=(2, 2), local_updates=False, client=client, **kw)
    assert np.linalg.norm(res.object.values - ref_obj) / np.linalg.norm(ref_obj) < 1e-4
    assert np.linalg.norm(res.probe.values - ref_probe) / np.linalg.norm(ref_probe) < 1e-4
    np.testing.assert_allclose(res.cost.values, ref_cost, rtol=1e-4)


def test_near_field_refusals(near_ds):
    with pytest.raises(OptionsError, match="engine.*far-field only"):
        prepare(near_ds, engine_options(engine="dm"))
    with pytest.raises(OptionsError, match="engine.*'hve'.*refine"):
        prepare(near_ds.drop_vars("probe"), engine_options(engine="hve", tiles=(2, 2), refine_probe=False))
    with pytest.raises(OptionsError, match="halo_m.*whole windows"):
        prepare(near_ds, engine_options(engine="gd", tiles=(2, 2), halo_m=5 * near_ds.attrs["pixel_size_m"]))
    ds = near_ds.copy()
    ds.attrs = {k: v for k, v in ds.attrs.items() if k != "effective_distance_m"}
    with pytest.raises(DatasetError, match="effective_distance_m"):
        prepare(ds, engine_options(engine="ml"))
    with pytest.raises(OptionsError, match="geometry"):
        dp.simulate(kind="pbtio3", geometry="near-field")


@pytest.mark.skipif(not os.path.exists(PETRA), reason="the PETRA III P25 file is not here")
def test_petra_near_field_imported_and_reconstructed(client):
    from daskptycho.io.cxi import read_cxi

    ds = read_cxi(PETRA, source_distance_m=PETRA_SOURCE_DISTANCE_M)
    assert ds.attrs["geometry"] == "near-field"
    assert np.isclose(ds.attrs["magnification"], (3.65e-3 + 1.12) / 3.65e-3)
    assert np.isclose(ds.attrs["pixel_size_m"], 55e-6 / ds.attrs["magnification"])
    res = dp.reconstruct(ds, engine="ml", iterations=8, probe_refine_start=2, batch_size=None, client=client)
    cost = res.cost.values
    assert np.all(np.diff(cost) < 0), cost
    assert cost[-1] < 0.6 * cost[0]


def test_device_gradients_near_field_match_the_reference(small_problem):
    """:func:`daskptycho.physics.cuda.gradients`' near-field branch, run on NumPy arrays (its
    kernels' host references): the same cost and gradients as the NumPy model."""
    from daskptycho.physics import cuda

    _, obj, probe, win, k, det = small_problem
    kern = propagators(k, det)
    intensity = (np.abs(multislice.forward(obj * np.float32(0.9), probe, win, kern)) ** 2).sum(axis=1).astype(np.float32)
    with dask.config.set({"daskptycho.kernels": "numpy"}):
        ref = multislice.gradients(obj, probe, win, kern, intensity)
    got = cuda.gradients(obj, probe, cuda.device_corners(win.corners, win.window, obj.shape[-2:], np), kern, intensity)
    assert np.isclose(float(got["cost"]), ref["cost"], rtol=1e-5)
    for name in ("object", "probe", "illumination", "probe_illumination"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-5 * np.abs(ref[name]).max())
