"""The reference engine: convergence to a known truth, determinism, options."""

from __future__ import annotations

import numpy as np
import pytest

import daskptycho as dp
from daskptycho.engines import engine_options
from daskptycho.engines.ml import run_ml
from daskptycho.engines.problem import prepare
from daskptycho.io.patterns import load_patterns
from daskptycho.metrics import phase_correlation


def _problem(ds, **kw):
    return prepare(ds, engine_options(kw))


def test_ml_reconstructs_known_truth_on_a_cluster(small_pbtio3, client):
    ds = dp.open_dataset(small_pbtio3)
    seen = []
    res = dp.reconstruct(ds, engine="ml", iterations=25, slices=2, client=client, progress=lambda i, c: seen.append(c))
    r, rms = phase_correlation(res.object, ds.truth_object, ds.position.values)
    assert r > 0.98, r
    cost = res.cost.values
    assert seen == list(cost)
    assert cost[-1] < 1e-2 * cost[0]
    # full-batch preconditioned descent on noise-free data decreases the cost monotonically
    assert np.all(np.diff(cost) < 0)
    # the result is on the data's own coordinates: pixel centres line up with the truth
    np.testing.assert_array_equal(res.y.values, ds.y.values)
    np.testing.assert_array_equal(res.x.values, ds.x.values)
    assert res.object.dtype == np.complex64 and res.object.dims == ("slice", "y", "x")
    assert res.attrs["engine"] == "ml" and '"iterations": 25' in res.attrs["options"]


def test_ml_is_deterministic_and_minibatch_differs(small_pbtio3):
    ds = dp.open_dataset(small_pbtio3)
    data = load_patterns(ds)
    a = run_ml(_problem(ds, iterations=3, slices=2, batch_size=16, seed=3), data)
    b = run_ml(_problem(ds, iterations=3, slices=2, batch_size=16, seed=3), data)
    c = run_ml(_problem(ds, iterations=3, slices=2, batch_size=16, seed=4), data)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_probe_refinement_moves_a_wrong_probe_towards_the_truth(small_pbtio3):
    ds = dp.open_dataset(small_pbtio3).load()
    ds.attrs["probe_defocus_m"] = ds.attrs["probe_defocus_m"] * 1.3  # a wrong guess
    data = load_patterns(ds)
    fixed = run_ml(_problem(ds, iterations=30, slices=2), data)
    pr = _problem(ds, iterations=30, slices=2, refine_probe=True, probe_refine_start=2, probe_step=1.0)
    refined = run_ml(pr, data)
    assert refined[2][-1] < 0.95 * fixed[2][-1]

    def probe_error(p, t):  # after the best global complex scale
        p, t = p[0].ravel(), t[0].ravel()
        c = np.vdot(p, t) / np.vdot(p, p)
        return np.linalg.norm(c * p - t) / np.linalg.norm(t)

    truth = ds.truth_probe.values
    assert probe_error(refined[1], truth) < 0.95 * probe_error(pr.probe, truth)


def test_probe_guess_from_store_is_rescaled_to_the_data(small_pbtio3):
    ds = dp.open_dataset(small_pbtio3).load()
    ds["probe"] = ds["truth_probe"] * 1e-3
    p = _problem(ds)
    np.testing.assert_allclose(np.sum(np.abs(p.probe) ** 2), np.sum(np.abs(ds.truth_probe.values) ** 2), rtol=0.02)


@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(engine="nope"), "engine"),
        (dict(iterations=0), "iterations"),
        (dict(batch_size=0), "batch_size"),
        (dict(cost="l1"), "cost"),
        (dict(slices=0), "slices"),
        (dict(tiles=(0, 2)), "tiles"),
        (dict(iteratons=3), "iteratons"),
        (dict(device="tpu"), "device"),
    ],
)
def test_bad_options_name_the_option(kw, option):
    with pytest.raises(dp.OptionsError) as e:
        _check(kw)
    assert e.value.option == option


def _check(kw):
    return engine_options(kw)


def test_multislice_needs_a_thickness(small_pbtio3):
    ds = dp.open_dataset(small_pbtio3).load()
    del ds.attrs["slice_thickness_m"]
    with pytest.raises(dp.OptionsError, match="slice_thickness_m"):
        _problem(ds, slices=3)


def test_gpu_device_without_gpu_is_one_clear_error(small_pbtio3):
    pytest.importorskip("numpy")
    from daskptycho.backend import array_module, gpu_available
    from daskptycho.errors import DeviceError

    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="device='cpu'"):
        array_module("gpu")


@pytest.mark.gpu
def test_gradients_on_gpu_match_cpu(small_pbtio3):
    import cupy

    ds = dp.open_dataset(small_pbtio3)
    data = load_patterns(ds)
    cpu = run_ml(_problem(ds, iterations=2, slices=2), data)
    gpu = run_ml(_problem(ds, iterations=2, slices=2, device="gpu"), cupy.asarray(data))
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-4, atol=1e-5)
