"""The compiled CPU kernels (daskptycho.physics.fused / _compiled) against the NumPy path.

Three CPU paths compute :func:`daskptycho.physics.gradients`: NumPy (the reference,
``daskptycho.kernels: numpy``), the fused per-slice kernels with batched backend FFTs
(any dtype, any FFT backend), and the per-position model with FFTW inside the compiled
loop (complex64 with pyFFTW). They must agree to float32 rounding, the per-position one
must also pass a finite-difference check of its own, and bad arguments must be refused
before any unchecked loop runs.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest

from daskptycho import physics
from daskptycho.physics import fused, multislice

pytest.importorskip("numba")

N = 16
HW = (30, 33)


def _crandn(rng, shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def _problem(seed, slices, modes, j=9, mask=False):
    rng = np.random.default_rng(seed)
    corners = np.stack([rng.integers(0, HW[0] - N + 1, j), rng.integers(0, HW[1] - N + 1, j)], axis=1)
    corners[1] = corners[0]  # coincident windows must accumulate
    obj = np.exp(1j * rng.uniform(-1, 1, (slices,) + HW) - rng.uniform(0, 0.2, (slices,) + HW)).astype(np.complex64)
    probe = (0.5 * _crandn(rng, (modes, N, N))).astype(np.complex64)
    kernel = physics.fresnel_kernel((N, N), 1e-10, 2.5e-12, 2e-10)
    other = obj * np.exp(0.3j * rng.standard_normal(obj.shape)).astype(np.complex64)
    inten = np.sum(np.abs(physics.forward(other, probe, physics.windows(corners, (N, N), HW), kernel)) ** 2, axis=1)
    inten = (inten * rng.uniform(0.5, 1.5, inten.shape) + 1e-3).astype(np.float32)
    m = (rng.uniform(size=(N, N)) > 0.2) if mask else None
    return rng, obj, probe, corners, kernel, inten, m


def _gradients(path, obj, probe, corners, kernel, inten, mask, cost, probe_gradient=True):
    """gradients() through one path: 'numpy', 'slices' (fused kernels, batched FFTs via
    scipy) or 'positions' (compiled per-position model with FFTW)."""
    settings = {"numpy": {"daskptycho.kernels": "numpy"},
                "slices": {"daskptycho.kernels": "numba", "daskptycho.fft.backend": "scipy"},
                "positions": {"daskptycho.kernels": "numba"}}[path]
    before = fused.FFT_TALLY["ffts"]
    with dask.config.set(settings):
        out = physics.gradients(obj, probe, physics.windows(corners, (N, N), HW), kernel, inten, mask=mask, cost=cost,
                                probe_gradient=probe_gradient)
    ran_per_position = fused.FFT_TALLY["ffts"] > before
    assert ran_per_position == (path == "positions"), path
    return out


@pytest.mark.parametrize("cost", ["amplitude", "poisson"])
@pytest.mark.parametrize("slices,modes,mask", [(1, 1, False), (3, 2, True), (4, 1, True)])
def test_the_three_cpu_paths_agree(slices, modes, mask, cost):
    pytest.importorskip("pyfftw")
    _, obj, probe, corners, kernel, inten, m = _problem(1, slices, modes, mask=mask)
    ref = _gradients("numpy", obj, probe, corners, kernel, inten, m, cost)
    for path in ("slices", "positions"):
        got = _gradients(path, obj, probe, corners, kernel, inten, m, cost)
        assert got["cost"] == pytest.approx(ref["cost"], rel=2e-5), path
        for key in ("object", "illumination", "probe", "probe_illumination"):
            scale = np.abs(ref[key]).max()
            np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=2e-5 * scale, err_msg=f"{path} {key}")


def test_per_position_path_is_deterministic_and_accumulates_into_out():
    pytest.importorskip("pyfftw")
    _, obj, probe, corners, kernel, inten, _ = _problem(2, 3, 2)
    a = _gradients("positions", obj, probe, corners, kernel, inten, None, "amplitude")
    b = _gradients("positions", obj, probe, corners, kernel, inten, None, "amplitude")
    for key in ("object", "illumination", "probe", "probe_illumination"):
        np.testing.assert_array_equal(a[key], b[key])
    # two halves added into one set of accumulators equal the whole batch
    out = {"object": np.zeros_like(obj), "illumination": np.zeros(obj.shape, np.float32),
           "probe": np.zeros_like(probe), "probe_illumination": np.zeros((N, N), np.float32)}
    cost = 0.0
    for half in (slice(0, 4), slice(4, None)):
        win = physics.windows(corners[half], (N, N), HW)
        cost += physics.gradients(obj, probe, win, kernel, inten, out=out, rows=np.arange(len(corners))[half])["cost"]
    assert cost == pytest.approx(a["cost"], rel=1e-6)
    for key in out:
        np.testing.assert_allclose(out[key], a[key], rtol=0, atol=1e-5 * np.abs(a[key]).max())


def test_threads_running_the_per_position_model_at_once_get_its_serial_results():
    # each thread keeps its own scratch (waves, far field) between calls: two threads, each
    # alternating between problems of different shapes, give exactly the serial results
    import concurrent.futures

    pytest.importorskip("pyfftw")
    problems = [_problem(3, 3, 2), _problem(4, 1, 1), _problem(5, 2, 1)]

    def run(p):
        _, obj, probe, corners, kernel, inten, m = p
        return _gradients("positions", obj, probe, corners, kernel, inten, m, "amplitude")

    serial = [run(p) for p in problems]
    order = [i % len(problems) for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda i: (i, run(problems[i])), order))
    for i, g in got:
        for key in ("object", "illumination", "probe", "probe_illumination"):
            np.testing.assert_array_equal(g[key], serial[i][key])


def test_rows_pick_patterns_in_place():
    pytest.importorskip("pyfftw")
    _, obj, probe, corners, kernel, inten, _ = _problem(3, 2, 1)
    rows = np.array([8, 0, 3])
    win = physics.windows(corners[rows], (N, N), HW)
    by_rows = physics.gradients(obj, probe, win, kernel, inten, rows=rows)
    by_copy = physics.gradients(obj, probe, win, kernel, inten[rows])
    np.testing.assert_array_equal(by_rows["object"], by_copy["object"])
    assert by_rows["cost"] == by_copy["cost"]


@pytest.mark.parametrize("bad", ["row out of range", "negative row", "too few rows", "pattern size", "out shape"])
def test_bad_arguments_are_refused_before_the_unchecked_loop(bad):
    pytest.importorskip("pyfftw")
    _, obj, probe, corners, kernel, inten, _ = _problem(4, 2, 1)
    win = physics.windows(corners, (N, N), HW)
    rows = np.arange(len(corners))
    kw = {}
    if bad == "row out of range":
        rows = rows.copy()
        rows[-1] = len(inten)
    elif bad == "negative row":
        rows = rows.copy()
        rows[0] = -1
    elif bad == "too few rows":
        rows = rows[:-1]
    elif bad == "pattern size":
        inten = np.ones((len(corners), N, N + 2), np.float32)
    else:
        kw["out"] = {"object": np.zeros((2,) + HW, np.complex128)}
    keep = inten.copy()
    with pytest.raises(ValueError):
        physics.gradients(obj, probe, win, kernel, inten, rows=rows, **kw)
    np.testing.assert_array_equal(inten, keep)


def test_per_position_gradient_matches_finite_differences():
    """The compiled model's own gradient, checked in float64 arithmetic of its cost:
    the cost is evaluated by the NumPy path in complex128 at O +- h d."""
    pytest.importorskip("pyfftw")
    rng, obj, probe, corners, kernel, inten, m = _problem(5, 3, 2, mask=True)
    out = _gradients("positions", obj, probe, corners, kernel, inten, m, "amplitude")
    win = physics.windows(corners, (N, N), HW)
    k128 = kernel.astype(np.complex128)

    def cost(o, p):
        far = physics.forward(o.astype(np.complex128), p.astype(np.complex128), win, k128)
        return physics.amplitude_cost(far, inten.astype(np.float64), m)

    h = 1e-4
    for grad, arg in ((out["object"], 0), (out["probe"], 1)):
        x = [obj, probe]
        d = _crandn(rng, x[arg].shape)
        plus = [v.astype(np.complex128) for v in x]
        minus = [v.astype(np.complex128) for v in x]
        plus[arg] = plus[arg] + h * d
        minus[arg] = minus[arg] - h * d
        fd = (cost(*plus) - cost(*minus)) / (2 * h)
        an = float(np.real(np.vdot(grad.astype(np.complex128).ravel(), d.ravel())))
        assert abs(fd - an) <= 1e-3 * abs(an), (arg, fd, an)


def test_forward_and_backward_fused_match_numpy():
    rng, obj, probe, corners, kernel, inten, _ = _problem(6, 3, 2)
    win = physics.windows(corners, (N, N), HW)
    g = _crandn(rng, (len(corners), 2, N, N)).astype(np.complex64)
    res = {}
    for name in ("numpy", "numba"):
        with dask.config.set({"daskptycho.kernels": name}):
            far, cache = physics.forward(obj, probe, win, kernel, keep=True)
            assert isinstance(cache, multislice._FusedCache) == (name == "numba")
            res[name] = (far, physics.backward(g.copy(), cache, win, obj.shape, kernel))
    np.testing.assert_allclose(res["numba"][0], res["numpy"][0], rtol=0, atol=1e-5 * np.abs(res["numpy"][0]).max())
    for key in ("object", "illumination", "probe", "probe_illumination"):
        ref = res["numpy"][1][key]
        np.testing.assert_allclose(res["numba"][1][key], ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=key)


def test_unknown_kernels_setting_is_one_clear_error():
    from daskptycho.errors import OptionsError

    with dask.config.set({"daskptycho.kernels": "fortran"}), pytest.raises(OptionsError, match="kernels"):
        fused.kernels()


_BITS_SCRIPT = """
import hashlib, sys
import numpy as np
from daskptycho import physics
from daskptycho.physics import fused
assert fused.kernels() is not None
rng = np.random.default_rng(12)
N, HW = 32, (80, 80)
out = []
for slices, modes in ((1, 1), (1, 2), (2, 2)):
    obj = (1 + 0.1 * (rng.standard_normal((slices,) + HW) + 1j * rng.standard_normal((slices,) + HW))).astype(np.complex64)
    probe = (rng.standard_normal((modes, N, N)) + 1j * rng.standard_normal((modes, N, N))).astype(np.complex64)
    win = physics.windows(rng.integers(0, HW[0] - N, (20, 2)), (N, N), HW)
    kernel = physics.fresnel_kernel((N, N), 1e-10, 2.5e-12, 2e-10) if slices > 1 else None
    data = (rng.random((20, N, N)) * 100).astype(np.float32)
    for cost in ("amplitude", "poisson"):
        r = physics.gradients(obj, probe, win, kernel, data, None, cost, True)
        out.append(hashlib.sha256(repr(r["cost"]).encode() + b"".join(
            np.ascontiguousarray(r[k]).tobytes() for k in ("object", "illumination", "probe", "probe_illumination"))).hexdigest())
print(" ".join(out))
"""


def test_a_process_that_compiles_the_kernels_and_one_that_loads_them_compute_the_same_bits(tmp_path):
    """The first run on a machine compiles the kernels; every later one loads them from
    Numba's cache. Both must give the same bits, or a lost worker's replacement (or a
    resumed run) would not recompute what the first run's workers did. With fast-math
    reassociation in the cost's loops, a two-mode gradient differed between the two."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    runs = [subprocess.run([sys.executable, "-c", _BITS_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert any((tmp_path / "numba-cache").rglob("*.nbi")), "the first process wrote no kernel cache"
    assert runs[0].stdout.split() == runs[1].stdout.split()
