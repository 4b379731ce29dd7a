"""FFT backends (pyFFTW with cached plans, scipy.fft, numpy.fft) and the hot path's window
cut/add, checked against independent references (float64 FFTs, flat-index gathers)."""

from __future__ import annotations

import threading

import dask
import numpy as np
import pytest
import scipy.fft

from daskptycho import backend, physics
from daskptycho.errors import OptionsError
from daskptycho.physics import multislice

BACKENDS = ["pyfftw", "scipy", "numpy"]


def _crandn(rng, shape, dtype=np.complex64):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


@pytest.fixture(params=BACKENDS)
def fft_backend(request):
    if request.param == "pyfftw":
        pytest.importorskip("pyfftw")
    with dask.config.set({"daskptycho.fft.backend": request.param}):
        yield request.param


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 3, 32, 48), (16, 16)])
def test_fft_matches_float64_reference_and_keeps_complex64(fft_backend, shape):
    a = _crandn(np.random.default_rng(0), shape)
    ref = scipy.fft.fft2(a.astype(np.complex128), norm="ortho")
    f = backend.fft2(a)
    assert backend.fft_backend() == fft_backend
    assert f.dtype == np.complex64 and f.shape == a.shape
    assert np.abs(f - ref).max() / np.abs(ref).max() < 1e-6
    # the orthonormal inverse undoes it, and the input is left alone
    a0 = a.copy()
    assert np.abs(backend.ifft2(f) - a).max() < 1e-5
    np.testing.assert_array_equal(a, a0)


def test_in_place_and_unnormalised(fft_backend):
    a = _crandn(np.random.default_rng(1), (4, 32, 32))
    ref = scipy.fft.fft2(a.astype(np.complex128))  # unnormalised
    b = a.copy()
    out = backend.fft2(b, out=b, norm="none")
    assert out is b
    assert np.abs(b - ref).max() / np.abs(ref).max() < 1e-6
    backend.ifft2(b, out=b, norm="none")
    np.testing.assert_allclose(b / (32 * 32), a, atol=1e-5)
    # a misaligned (offset) input still transforms right
    raw = np.empty(a.size + 1, np.complex64)[1:].reshape(a.shape)
    raw[...] = a
    np.testing.assert_allclose(backend.fft2(raw), backend.fft2(a), atol=1e-5)


def test_unknown_backend_is_an_options_error():
    with dask.config.set({"daskptycho.fft.backend": "mkl"}):
        with pytest.raises(OptionsError, match="fft.backend"):
            backend.fft2(np.ones((4, 4), np.complex64))


def test_without_pyfftw_auto_falls_back_to_scipy_and_pyfftw_warns(monkeypatch):
    monkeypatch.setattr(backend, "_pyfftw", False)
    assert backend.fft_backend() == "scipy"
    with dask.config.set({"daskptycho.fft.backend": "pyfftw"}):
        with pytest.warns(RuntimeWarning, match="pyFFTW is not installed"):
            assert backend.fft_backend() == "scipy"
        with pytest.warns(RuntimeWarning):
            f = backend.fft2(np.eye(8, dtype=np.complex64))
    np.testing.assert_allclose(f, scipy.fft.fft2(np.eye(8), norm="ortho"), atol=1e-6)


def test_plans_are_per_thread_and_threads_give_right_answers():
    pytest.importorskip("pyfftw")
    rng = np.random.default_rng(2)
    inputs = [_crandn(rng, (8, 64, 64)) for _ in range(4)]
    results = [None] * 4

    def work(i):
        for _ in range(20):
            results[i] = backend.fft2(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, f in zip(inputs, results):
        np.testing.assert_allclose(f, scipy.fft.fft2(a, norm="ortho"), atol=1e-4)


def test_fft_threads_from_config():
    with dask.config.set({"daskptycho.fft.workers": 3}):
        assert backend.fft_threads() == 3
    assert backend.fft_threads() >= 1
    assert backend.fft_threads(1000) == 1  # small transforms outside a worker: one thread


def _windows_problem(seed=0, n=8, hw=(20, 23), j=7):
    rng = np.random.default_rng(seed)
    corners = np.stack([rng.integers(0, hw[0] - n + 1, j), rng.integers(0, hw[1] - n + 1, j)], axis=1)
    corners[1] = corners[0]  # overlapping windows must accumulate
    return corners, (n, n), hw


def test_window_cut_and_add_equal_the_flat_index_gather_and_bincount():
    corners, window, hw = _windows_problem()
    rng = np.random.default_rng(3)
    obj = _crandn(rng, (3,) + hw)
    win = physics.windows(corners, window, hw)
    flat = physics.window_index(corners, window, hw)
    np.testing.assert_array_equal(multislice._gather(obj, win), obj.reshape(3, -1)[:, flat])
    np.testing.assert_array_equal(multislice._gather(obj, flat), obj.reshape(3, -1)[:, flat])
    vals = _crandn(rng, (3, len(corners)) + window)
    by_windows = multislice._scatter(np.zeros((3,) + hw, np.complex64), win, vals)[0]
    by_bincount = np.zeros((3, hw[0] * hw[1]), np.complex64)
    backend.scatter_add(by_bincount, flat.reshape(-1), vals.reshape(3, -1))
    np.testing.assert_allclose(by_windows, by_bincount.reshape((3,) + hw), atol=1e-5)


def test_gradients_same_with_windows_index_array_and_general_index():
    corners, window, hw = _windows_problem(seed=4)
    rng = np.random.default_rng(5)
    obj = np.exp(1j * rng.uniform(-1, 1, (2,) + hw)).astype(np.complex64)
    probe = _crandn(rng, (2,) + window) * 0.3
    kernel = physics.fresnel_kernel(window, 1e-10, 2.5e-12, 2e-10)
    inten = rng.uniform(0, 1, (len(corners),) + window).astype(np.float32)
    win = physics.windows(corners, window, hw)
    flat = physics.window_index(corners, window, hw)
    a = physics.gradients(obj, probe, win, kernel, inten)
    b = physics.gradients(obj, probe, flat, kernel, inten)
    # the same windows through the general path: the object mirrored left-right and the
    # index mirrored alike is not rectangular-ascending, so it takes the flat gather/scatter
    mirrored = (flat // hw[1]) * hw[1] + (hw[1] - 1 - flat % hw[1])
    assert multislice._as_windows(mirrored, obj.shape) is None
    c = physics.gradients(obj[..., ::-1].copy(), probe, mirrored, kernel, inten)
    for k in ("object", "illumination"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a[k], c[k][..., ::-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a["probe"], c["probe"], rtol=1e-4, atol=1e-4)
    assert a["cost"] == pytest.approx(c["cost"], rel=1e-5)


@pytest.mark.parametrize("kernels", ["numpy", "auto"])
@pytest.mark.parametrize("slices,modes", [(1, 1), (3, 2)])
def test_fft_count_of_one_gradient_call(monkeypatch, slices, modes, kernels):
    """Forward and gradient need, per position and mode, the far field and its adjoint
    and two FFTs per slice boundary each way: K (2 + 4 (S - 1)) 2-D transforms, whether
    they go through backend.fft2/ifft2 (NumPy path) or run inside the compiled kernels."""
    import dask

    from daskptycho.physics import fused

    corners, window, hw = _windows_problem(seed=6, j=5)
    rng = np.random.default_rng(7)
    obj = np.exp(1j * rng.uniform(-1, 1, (slices,) + hw)).astype(np.complex64)
    probe = _crandn(rng, (modes,) + window)
    kernel = physics.fresnel_kernel(window, 1e-10, 2.5e-12, 2e-10)
    inten = rng.uniform(0, 1, (len(corners),) + window).astype(np.float32)
    count = {"ffts": 0}
    orig = backend._transform

    def counting(a, *args):
        count["ffts"] += int(np.prod(a.shape[:-2]))
        return orig(a, *args)

    monkeypatch.setattr(backend, "_transform", counting)
    before = fused.FFT_TALLY["ffts"]
    with dask.config.set({"daskptycho.kernels": kernels}):
        physics.gradients(obj, probe, physics.windows(corners, window, hw), kernel, inten)
    compiled = fused.FFT_TALLY["ffts"] - before
    if kernels == "numpy":
        assert compiled == 0
    assert count["ffts"] + compiled == len(corners) * modes * (2 + 4 * (slices - 1))


def test_allocator_thresholds_rise_with_the_path_that_needs_them():
    """A fresh process keeps glibc's defaults through small FFTs; the compiled kernels'
    plans ask for 1/2 MiB, a batched FFT of >= 1 MiB (NumPy path, dm) for 32/64 MiB;
    thresholds never fall."""
    import subprocess
    import sys

    pytest.importorskip("numba")
    pytest.importorskip("pyfftw")
    code = ("import numpy as np\nfrom daskptycho import backend\nfrom daskptycho.physics import fused\n"
            "backend.fft2(np.ones((2, 8, 8), np.complex64)); print(backend._allocator_tuned)\n"
            "fused.fftw_plans((1, 8, 8)); print(backend._allocator_tuned)\n"
            "backend.fft2(np.ones((9, 128, 128), np.complex64)); print(backend._allocator_tuned)\n"
            "backend.tune_allocator(1, 2); print(backend._allocator_tuned)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    assert out == ["False", "(1, 2)", "(32, 64)", "(32, 64)"]


_FFT_IN_A_FRESH_PROCESS = """
import sys, hashlib, numpy as np, dask
from daskptycho import backend
rng = np.random.default_rng(0)
a = backend.empty((8, 96, 96))
a[...] = (rng.standard_normal(a.shape) + 1j * rng.standard_normal(a.shape)).astype(np.complex64)
with dask.config.set({"daskptycho.fft.backend": "pyfftw", "daskptycho.fft.planner": "measure",
                      "daskptycho.fft.wisdom": sys.argv[1]}):
    out = backend.fft2(a)
print(hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest())
"""


def test_measured_plans_are_shared_so_fresh_processes_compute_the_same_bits(tmp_path):
    """A restarted worker or a resumed run plans afresh: with FFTW_MEASURE alone it may
    pick another algorithm (other rounding). The wisdom file makes every process reuse
    the first one's plan."""
    import json
    import subprocess
    import sys

    pytest.importorskip("pyfftw")
    wisdom = tmp_path / "wisdom.json"
    def run():
        return subprocess.run([sys.executable, "-c", _FFT_IN_A_FRESH_PROCESS, str(wisdom)], capture_output=True, text=True, check=True)

    runs = [run()]
    written = wisdom.stat().st_mtime_ns
    runs += [run(), run()]
    digests = {r.stdout.strip() for r in runs}
    assert len(digests) == 1, digests
    assert wisdom.stat().st_mtime_ns == written  # the later processes planned from the file, measured nothing
    text = json.loads(wisdom.read_text())  # data (base64 strings), not a pickle
    assert text["wisdom"] and all(isinstance(w, str) for w in text["wisdom"])
