"""The GPU hot path (:mod:`daskptycho.physics.cuda`).

Without a GPU: the NumPy reference of every kernel, run through the same orchestration
as on the device, equals the CPU model (:func:`daskptycho.physics.gradients`, the
difference map of :mod:`daskptycho.physics.dm`) and its adjoint identity holds.
With one (``gpu``-marked): every custom kernel equals its NumPy reference, and the
device gradient equals the CPU one to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from daskptycho import physics
from daskptycho.backend import scatter_add
from daskptycho.physics import cuda, dm, window_index


def _problem(seed=0, slices=3, modes=2, n=16, h=40, w=44, j=12, extra_rows=3):
    rng = np.random.default_rng(seed)
    c64 = np.complex64
    obj = (1 + 0.3 * (rng.normal(size=(slices, h, w)) + 1j * rng.normal(size=(slices, h, w)))).astype(c64)
    probe = (rng.normal(size=(modes, n, n)) + 1j * rng.normal(size=(modes, n, n))).astype(c64)
    corners = np.stack([rng.integers(0, h - n + 1, j), rng.integers(0, w - n + 1, j)], 1)
    kernel = np.exp(1j * rng.uniform(0, 2 * np.pi, (n, n))).astype(c64)
    intensity = rng.uniform(0, 5, (j + extra_rows, n, n)).astype(np.float32)
    rows = rng.permutation(j + extra_rows)[:j]
    mask = rng.uniform(size=(n, n)) > 0.2
    return obj, probe, corners, kernel, intensity, rows, mask


@pytest.mark.parametrize("cost", ["amplitude", "poisson"])
@pytest.mark.parametrize("slices, modes", [(1, 1), (3, 2)])
def test_reference_orchestration_equals_the_cpu_model(cost, slices, modes):
    obj, probe, corners, kernel, inten, rows, mask = _problem(slices=slices, modes=modes)
    n = probe.shape[-1]
    ref = physics.gradients(obj, probe, physics.windows(corners, (n, n), obj.shape[1:]), kernel, inten[rows], mask, cost)
    got = cuda.gradients(obj, probe, cuda.device_corners(corners, (n, n), obj.shape[1:], np), kernel, inten,
                         rows.astype(np.int32), mask, cost)
    for name in ("object", "illumination", "probe", "probe_illumination"):
        np.testing.assert_allclose(got[name], ref[name], rtol=2e-5, atol=2e-5 * np.abs(ref[name]).max(), err_msg=name)
    assert float(got["cost"]) == pytest.approx(ref["cost"], rel=1e-6)


@pytest.mark.parametrize("slices, modes", [(2, 1), (5, 2), (7, 1)])
def test_reference_orchestration_with_wave_checkpoints_is_the_keep_all_result(slices, modes, monkeypatch):
    """The orchestration recomputes each earlier segment's waves from its checkpoint with
    the same kernels and FFTs: on the NumPy reference kernels the same bits, two more FFTs
    per mode and position for each repeated propagation, and less memory held."""
    import tracemalloc

    from daskptycho import backend
    from daskptycho.physics import wave_checkpoints as wc

    obj, probe, corners, kernel, inten, rows, mask = _problem(slices=slices, modes=modes)
    n = probe.shape[-1]
    c32 = cuda.device_corners(corners, (n, n), obj.shape[1:], np)
    tally = [0]
    orig = backend._transform

    def counting(a, forward, xp, out, norm):
        tally[0] += int(np.prod(a.shape[:-2]))
        return orig(a, forward, xp, out, norm)

    monkeypatch.setattr(backend, "_transform", counting)

    def run(interval):  # the problem as it is when called
        before = tally[0]
        tracemalloc.start()
        try:
            res = cuda.gradients(obj, probe, c32, kernel, inten, rows.astype(np.int32), mask, "amplitude",
                                 wave_checkpoints=interval)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return res, tally[0] - before, peak

    ref, ffts_ref, peak_ref = run(1)
    assert ffts_ref == len(corners) * wc.gradient_ffts(slices, modes, 1)
    for interval in sorted({2, 3, slices}):
        got, ffts, peak = run(interval)
        assert float(got["cost"]) == float(ref["cost"])
        for name in ("object", "illumination", "probe", "probe_illumination"):
            np.testing.assert_array_equal(got[name], ref[name], err_msg=f"c={interval} {name}")
        assert ffts - ffts_ref == 2 * modes * len(corners) * wc.recomputed_propagations(slices, interval)
    if slices == 7:
        # 32 slices: 5 checkpoints (and the probe) + 5 waves of a segment kept instead of 31
        # (the reference kernels' own temporaries, ~17 waves here, come on top of both)
        obj, probe, corners, kernel, inten, rows, mask = _problem(slices=32, modes=1, j=24)
        c32 = cuda.device_corners(corners, (n, n), obj.shape[1:], np)
        run(1)  # FFT plans made before memory is traced
        (_, _, keep_all), (_, _, checkpointed) = run(1), run(6)
        assert checkpointed < 0.7 * keep_all, (checkpointed, keep_all)
    # a launch takes as many more positions as the smaller working set allows
    assert wc.gradient_working_set(100, 1, (1024, 1024), 10, "cuda") < 0.21 * wc.gradient_working_set(100, 1, (1024, 1024), 1, "cuda")


def test_reference_adjoint_slice_is_the_adjoint_of_window_multiply():
    # <A x, y> = <x, A^H y> for the map (obj) -> psi * obj[windows] with psi fixed
    obj, probe, corners, *_ = _problem(slices=1, modes=2)
    rng = np.random.default_rng(3)
    n = probe.shape[-1]
    c = cuda.device_corners(corners, (n, n), obj.shape[1:], np)
    psi = np.broadcast_to(probe[None], (len(corners),) + probe.shape)
    y = (rng.normal(size=psi.shape) + 1j * rng.normal(size=psi.shape)).astype(np.complex64)
    ax = cuda.window_multiply(psi, obj[0], c, np.empty(psi.shape, np.complex64))
    g_obj = np.zeros(obj.shape[1:], np.complex64)
    cuda.adjoint_slice(y.copy(), psi, np.ones_like(obj[0]), c, g_obj, np.zeros(obj.shape[1:], np.float32))
    lhs = np.vdot(y, ax)
    rhs = np.vdot(g_obj, obj[0])
    assert abs(lhs - rhs) < 1e-4 * abs(lhs)


def test_reference_difference_map_equals_the_cpu_difference_map():
    rng = np.random.default_rng(1)
    j, k, n_l, n, h, w = 7, 3, 2, 16, 40, 40
    probe = (rng.normal(size=(k, n, n)) + 1j * rng.normal(size=(k, n, n))).astype(np.complex64)
    obj = (rng.normal(size=(n_l, h, w)) + 1j * rng.normal(size=(n_l, h, w))).astype(np.complex64)
    corners = np.stack([rng.integers(0, h - n, j), rng.integers(0, w - n, j)], 1)
    psi = (rng.normal(size=(j, k, n_l, n, n)) + 1j * rng.normal(size=(j, k, n_l, n, n))).astype(np.complex64)
    inten = rng.uniform(0, 3, (j, n, n)).astype(np.float32)
    mask = rng.uniform(size=(n, n)) > 0.3
    idx = window_index(corners, (n, n), (h, w))
    new_ref = dm.dm_update_views(psi.copy(), probe, obj, idx, inten, mask, 0.8)
    sums_ref = dm.dm_object_sums(new_ref, probe, idx, obj.shape)
    c = cuda.device_corners(corners, (n, n), (h, w), np)
    work = cuda.fft_unscaled(cuda.dm_views_in(psi, probe, obj, c, np.empty_like(psi), False), True)
    assert float(cuda.dm_fourier(work, inten, mask, True)) == pytest.approx(dm.fourier_error(probe, obj, idx, inten, mask), rel=1e-6)
    work = cuda.fft_unscaled(cuda.dm_views_in(psi, probe, obj, c, work, True), True)
    cuda.dm_fourier(work, inten, mask, False)
    work = cuda.fft_unscaled(work, False)
    num, den = np.zeros(obj.shape, np.complex128), np.zeros((h, w))
    new = psi.copy()
    cuda.dm_views_out(new, work, probe, obj, c, 0.8, num, den)
    np.testing.assert_allclose(new, new_ref, rtol=1e-5, atol=1e-5 * np.abs(new_ref).max())
    np.testing.assert_allclose(num, sums_ref["object_num"], rtol=1e-5, atol=1e-5 * np.abs(num).max())
    np.testing.assert_allclose(den, sums_ref["object_den"], rtol=1e-6)
    pn, pd = np.zeros((k, n, n), np.complex128), np.zeros((n, n))
    cuda.dm_probe_sums(new_ref, obj, c, pn, pd)
    ps = dm.dm_probe_sums(new_ref, obj, idx)
    np.testing.assert_allclose(pn, ps["probe_num"], rtol=1e-5, atol=1e-5 * np.abs(pn).max())
    np.testing.assert_allclose(pd, ps["probe_den"], rtol=1e-6)


def test_device_corners_refuse_windows_outside_the_object():
    with pytest.raises(ValueError, match="outside"):
        cuda.device_corners(np.array([[0, 30]]), (16, 16), (40, 40), np)


# ---------------------------------------------------------------------------- on a GPU
@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


def _both(cp, *arrays):
    return [None if a is None else cp.asarray(a) for a in arrays]


@pytest.mark.gpu
@pytest.mark.parametrize("stride0", [False, True])
def test_window_multiply_kernel(cp, stride0):
    obj, probe, corners, *_ = _problem()
    n = probe.shape[-1]
    c = cuda.device_corners(corners, (n, n), obj.shape[1:], np)
    rng = np.random.default_rng(5)
    psi = probe[None] if stride0 else (rng.normal(size=(len(corners),) + probe.shape) + 0j).astype(np.complex64)
    shape = (len(corners),) + probe.shape
    ref = cuda.window_multiply(psi, obj[1], c, np.empty(shape, np.complex64))
    got = cuda.window_multiply(*_both(cp, psi, obj[1], c), cp.empty(shape, cp.complex64))
    np.testing.assert_allclose(got.get(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("poisson", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_cost_gradient_kernel(cp, poisson, masked):
    obj, probe, corners, kernel, inten, rows, mask = _problem()
    rng = np.random.default_rng(6)
    far = (rng.normal(size=(len(corners),) + probe.shape) + 1j * rng.normal(size=(len(corners),) + probe.shape)).astype(np.complex64)
    m = mask if masked else None
    r32 = rows.astype(np.int32)
    ref_far = far.copy()
    ref = float(cuda.cost_gradient(ref_far, inten, r32, m, 0.25, poisson))
    dev_far = cp.asarray(far)
    got = float(cuda.cost_gradient(dev_far, cp.asarray(inten), cp.asarray(r32), None if m is None else cp.asarray(m), 0.25, poisson))
    assert got == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(dev_far.get(), ref_far, rtol=1e-4, atol=1e-5 * np.abs(ref_far).max())


@pytest.mark.gpu
@pytest.mark.parametrize("stride0", [False, True])
def test_adjoint_slice_kernel(cp, stride0):
    obj, probe, corners, *_ = _problem()
    n = probe.shape[-1]
    c = cuda.device_corners(corners, (n, n), obj.shape[1:], np)
    rng = np.random.default_rng(7)
    shape = (len(corners),) + probe.shape
    g = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    psi = probe[None] if stride0 else (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    acc = [np.zeros(obj.shape[1:], np.complex64), np.zeros(obj.shape[1:], np.float32)]
    ref_g = cuda.adjoint_slice(g.copy(), psi, obj[2], c, *acc)
    dacc = [cp.zeros(obj.shape[1:], cp.complex64), cp.zeros(obj.shape[1:], cp.float32)]
    got_g = cuda.adjoint_slice(*_both(cp, g, psi, obj[2], c), *dacc)
    np.testing.assert_allclose(got_g.get(), ref_g, rtol=1e-5, atol=1e-5)
    for a, b in zip(dacc, acc):
        np.testing.assert_allclose(a.get(), b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.gpu
def test_window_abs2_sum_and_gather_kernels(cp):
    obj, probe, corners, *_ = _problem(j=300, h=60, w=60)
    n = probe.shape[-1]
    c = cuda.device_corners(corners, (n, n), obj.shape[1:], np)
    ref = cuda.window_abs2_sum(obj[0], c, (n, n), np.ones((n, n), np.float32))
    got = cuda.window_abs2_sum(cp.asarray(obj[0]), cp.asarray(c), (n, n), cp.ones((n, n), cp.float32))
    np.testing.assert_allclose(got.get(), ref, rtol=1e-5)
    np.testing.assert_array_equal(cuda.gather_windows(cp.asarray(obj), cp.asarray(c), (n, n)).get(),
                                  cuda.gather_windows(obj, c, (n, n)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, np.complex128])
def test_scatter_windows_kernel(cp, dtype):
    obj, probe, corners, *_ = _problem(j=50)
    n = probe.shape[-1]
    c = cuda.device_corners(corners, (n, n), obj.shape[1:], np)
    rng = np.random.default_rng(8)
    vdtype = np.complex64 if np.dtype(dtype).kind == "c" else np.float32
    values = rng.normal(size=(2, len(corners), n, n)).astype(vdtype)
    if np.dtype(dtype).kind == "c":
        values = values + 1j * rng.normal(size=values.shape).astype(np.float32)
    target = np.zeros((2,) + obj.shape[1:], dtype)
    ref = cuda.scatter_windows(target.copy(), c, values)
    got = cuda.scatter_windows(cp.asarray(target), cp.asarray(c), cp.asarray(values))
    np.testing.assert_allclose(got.get(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_difference_map_kernels(cp):
    rng = np.random.default_rng(9)
    j, k, n_l, n, h, w = 40, 3, 2, 16, 48, 48
    probe = (rng.normal(size=(k, n, n)) + 1j * rng.normal(size=(k, n, n))).astype(np.complex64)
    obj = (rng.normal(size=(n_l, h, w)) + 1j * rng.normal(size=(n_l, h, w))).astype(np.complex64)
    corners = cuda.device_corners(np.stack([rng.integers(0, h - n, j), rng.integers(0, w - n, j)], 1), (n, n), (h, w), np)
    psi = (rng.normal(size=(j, k, n_l, n, n)) + 1j * rng.normal(size=(j, k, n_l, n, n))).astype(np.complex64)
    inten = rng.uniform(0, 3, (j, n, n)).astype(np.float32)
    mask = rng.uniform(size=(n, n)) > 0.3
    d = dict(zip("psi probe obj c inten mask".split(), _both(cp, psi, probe, obj, corners, inten, mask)))
    for twice in (False, True):
        ref = cuda.dm_views_in(psi, probe, obj, corners, np.empty_like(psi), twice)
        got = cuda.dm_views_in(d["psi"], d["probe"], d["obj"], d["c"], cp.empty_like(d["psi"]), twice)
        np.testing.assert_allclose(got.get(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    far = cuda.fft_unscaled(cuda.dm_views_in(psi, probe, obj, corners, np.empty_like(psi), True), True)
    dfar = cp.asarray(far)
    assert float(cuda.dm_fourier(dfar, d["inten"], d["mask"], True)) == pytest.approx(float(cuda.dm_fourier(far, inten, mask, True)), rel=1e-5)
    cuda.dm_fourier(far, inten, mask, False)
    cuda.dm_fourier(dfar, d["inten"], d["mask"], False)
    np.testing.assert_allclose(dfar.get(), far, rtol=1e-4, atol=1e-5 * np.abs(far).max())
    num, den = np.zeros(obj.shape, np.complex128), np.zeros((h, w))
    ref = cuda.dm_views_out(psi.copy(), far, probe, obj, corners, 0.8, num, den)
    dnum, dden = cp.zeros(obj.shape, cp.complex128), cp.zeros((h, w), cp.float64)
    got = cuda.dm_views_out(d["psi"].copy(), cp.asarray(far), d["probe"], d["obj"], d["c"], 0.8, dnum, dden)
    np.testing.assert_allclose(got.get(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(dnum.get(), num, rtol=1e-5, atol=1e-5 * np.abs(num).max())
    np.testing.assert_allclose(dden.get(), den, rtol=1e-6)
    pn, pd = np.zeros((k, n, n), np.complex128), np.zeros((n, n))
    cuda.dm_probe_sums(psi, obj, corners, pn, pd)
    dpn, dpd = cp.zeros((k, n, n), cp.complex128), cp.zeros((n, n), cp.float64)
    cuda.dm_probe_sums(d["psi"], d["obj"], d["c"], dpn, dpd)
    np.testing.assert_allclose(dpn.get(), pn, rtol=1e-5, atol=1e-5 * np.abs(pn).max())
    np.testing.assert_allclose(dpd.get(), pd, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("cost", ["amplitude", "poisson"])
def test_device_gradients_equal_the_cpu_model(cp, cost):
    obj, probe, corners, kernel, inten, rows, mask = _problem(slices=4, modes=2, n=32, h=90, w=96, j=60)
    n = probe.shape[-1]
    ref = physics.gradients(obj, probe, physics.windows(corners, (n, n), obj.shape[1:]), kernel, inten[rows], mask, cost)
    win = physics.windows(corners, (n, n), obj.shape[1:])
    got = physics.gradients(cp.asarray(obj), cp.asarray(probe), win, cp.asarray(kernel), cp.asarray(inten), cp.asarray(mask),
                            cost, rows=rows)
    assert isinstance(got["cost"], float) and got["cost"] == pytest.approx(ref["cost"], rel=1e-5)
    for name in ("object", "illumination", "probe", "probe_illumination"):
        np.testing.assert_allclose(got[name].get(), ref[name], rtol=1e-3, atol=1e-4 * np.abs(ref[name]).max(), err_msg=name)


@pytest.mark.gpu
def test_device_gradients_with_wave_checkpoints(cp):
    """On the device the recomputed waves are the same bits, but the adjoint's float
    atomics add in no fixed order, so two runs agree to float32 rounding only."""
    obj, probe, corners, kernel, inten, rows, mask = _problem(slices=7, modes=2)
    n = probe.shape[-1]
    c = cuda.device_corners(corners, (n, n), obj.shape[1:], cp)
    args = _both(cp, obj, probe) + [c] + _both(cp, kernel, inten, rows.astype(np.int32), mask)
    ref = cuda.gradients(*args, wave_checkpoints=1)
    for interval in (2, 3):
        got = cuda.gradients(*args, wave_checkpoints=interval)
        assert float(got["cost"]) == pytest.approx(float(ref["cost"]), rel=1e-6)
        for name in ("object", "illumination", "probe", "probe_illumination"):
            r = ref[name].get()
            np.testing.assert_allclose(got[name].get(), r, rtol=1e-5, atol=1e-5 * np.abs(r).max(), err_msg=name)
    free = cuda.launch_budget(cp)
    assert cuda.positions_per_launch((n, n), 7, 2, cp, wave_checkpoints=3, budget_bytes=free) >= \
        cuda.positions_per_launch((n, n), 7, 2, cp, wave_checkpoints=1, budget_bytes=free)


@pytest.mark.gpu
def test_backend_scatter_add_takes_complex_on_the_gpu(cp):
    rng = np.random.default_rng(10)
    target = np.zeros((2, 50), np.complex64)
    idx = rng.integers(0, 50, 200)
    vals = (rng.normal(size=(2, 200)) + 1j * rng.normal(size=(2, 200))).astype(np.complex64)
    ref = scatter_add(target.copy(), idx, vals)
    got = scatter_add(cp.asarray(target), cp.asarray(idx), cp.asarray(vals))
    np.testing.assert_allclose(got.get(), ref, rtol=1e-5, atol=1e-5)
