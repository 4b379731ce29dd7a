"""Wave checkpoints in the multislice adjoint (:mod:`daskptycho.physics.wave_checkpoints`).

With an interval c > 1 the forward pass keeps the incident waves of slices 0, c, 2c, ...
and of the last segment only; the backward pass recomputes the others from their
checkpoint. Recomputation repeats the very operations of the forward pass on the same
inputs (the same FFT plans on equally aligned arrays), so on every CPU path the
gradients and the cost must be the same bits as with every wave kept; the FFT count
must rise by exactly two per mode, position and recomputed propagation; the memory a
call holds must fall; and ``auto`` must keep every wave whenever one position fits.
"""

from __future__ import annotations

import math
import tracemalloc

import dask
import numpy as np
import pytest

from daskptycho import backend, physics
from daskptycho.errors import OptionsError
from daskptycho.physics import fused, multislice
from daskptycho.physics import wave_checkpoints as wc
from daskptycho.tasks.updates import gradient_sum, positions_per_chunk

N = 16
HW = (30, 33)
KEYS = ("object", "illumination", "probe", "probe_illumination")
# the three CPU paths of physics.gradients (tests/test_fused.py): NumPy, the fused per-slice
# kernels with batched FFTs, the compiled per-position model with FFTW inside its loop
PATHS = {"numpy": {"daskptycho.kernels": "numpy"},
         "slices": {"daskptycho.kernels": "numba", "daskptycho.fft.backend": "scipy"},
         "positions": {"daskptycho.kernels": "numba"}}


def _problem(slices, modes, j=7, seed=0, n=N, hw=HW):
    rng = np.random.default_rng(seed)
    corners = np.stack([rng.integers(0, hw[0] - n + 1, j), rng.integers(0, hw[1] - n + 1, j)], axis=1)
    corners[1] = corners[0]  # coincident windows accumulate
    obj = np.exp(1j * rng.uniform(-1, 1, (slices,) + hw) - rng.uniform(0, 0.2, (slices,) + hw)).astype(np.complex64)
    probe = (0.5 * (rng.standard_normal((modes, n, n)) + 1j * rng.standard_normal((modes, n, n)))).astype(np.complex64)
    kernel = physics.fresnel_kernel((n, n), 1e-10, 2.5e-12, 2e-10)
    inten = rng.uniform(0.5, 2.0, (j, n, n)).astype(np.float32)
    return obj, probe, corners, kernel, inten


def _needs(path):
    if path != "numpy":
        pytest.importorskip("numba")
    if path == "positions":
        pytest.importorskip("pyfftw")


class _CountFFTs:
    """2-D FFTs run: through the backend (batched paths: the batch sizes summed) and inside
    the compiled per-position model (``FFT_TALLY``)."""

    def __init__(self, monkeypatch):
        self.backend = 0
        orig = backend._transform

        def counting(a, forward, xp, out, norm):
            self.backend += int(np.prod(a.shape[:-2])) if a.ndim > 2 else 1
            return orig(a, forward, xp, out, norm)

        monkeypatch.setattr(backend, "_transform", counting)

    def __call__(self, fn):
        b, t = self.backend, fused.FFT_TALLY["ffts"]
        out = fn()
        return out, (self.backend - b) + (fused.FFT_TALLY["ffts"] - t)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("slices", [1, 2, 5, 7])
@pytest.mark.parametrize("modes", [1, 2])
def test_checkpointed_gradients_are_the_keep_all_bits_and_cost_the_recomputed_ffts(path, slices, modes, monkeypatch):
    _needs(path)
    obj, probe, corners, kernel, inten = _problem(slices, modes)
    j = len(corners)
    win = physics.windows(corners, (N, N), HW)
    count = _CountFFTs(monkeypatch)
    with dask.config.set(PATHS[path]):
        ref, ffts_ref = count(lambda: physics.gradients(obj, probe, win, kernel, inten, wave_checkpoints=1))
        assert ffts_ref == j * wc.gradient_ffts(slices, modes, 1)
        for c in sorted({2, 3, slices}):
            got, ffts = count(lambda c=c: physics.gradients(obj, probe, win, kernel, inten, wave_checkpoints=c))
            assert got["cost"] == ref["cost"], (path, c)
            for key in KEYS:
                np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{path} c={c} {key}")
            # 2 FFTs per mode and position for every propagation the adjoint repeats
            assert ffts - ffts_ref == 2 * modes * j * wc.recomputed_propagations(slices, c), (path, c)
    # the intervals that keep or recompute something at all
    if slices == 7:
        assert [wc.recomputed_propagations(7, c) for c in (1, 2, 3, 6, 7, 9)] == [0, 3, 4, 5, 0, 0]


def test_backward_can_reuse_a_checkpointed_cache():
    """The last segment's waves, left by forward, are released as backward uses them; a
    second backward with the same cache recomputes them and gets the same result."""
    obj, probe, corners, kernel, _ = _problem(5, 2)
    index = physics.window_index(corners, (N, N), HW)
    with dask.config.set({"daskptycho.kernels": "numpy"}):
        far, cache = physics.forward(obj, probe, index, kernel, keep=True, wave_checkpoints=2)
        g = (far * np.float32(0.3)).astype(np.complex64)
        a = physics.backward(g.copy(), cache, index, obj.shape, kernel)
        assert not cache.tail
        b = physics.backward(g.copy(), cache, index, obj.shape, kernel)
        _, keep_all = physics.forward(obj, probe, index, kernel, keep=True)
        ref = physics.backward(g.copy(), keep_all, index, obj.shape, kernel)
    for key in KEYS:
        np.testing.assert_array_equal(a[key], ref[key], err_msg=key)
        np.testing.assert_array_equal(b[key], ref[key], err_msg=key)


def test_per_position_scratch_shrinks(monkeypatch):
    pytest.importorskip("numba")
    pytest.importorskip("pyfftw")
    slices, modes = 32, 1
    obj, probe, corners, kernel, inten = _problem(slices, modes, j=3)
    win = physics.windows(corners, (N, N), HW)
    shapes = []
    orig = multislice.empty

    def recording(shape, dtype=np.complex64, xp=np):
        shapes.append(tuple(shape))
        return orig(shape, dtype, xp)

    monkeypatch.setattr(multislice, "empty", recording)
    with dask.config.set(PATHS["positions"]):
        for c in (1, 2, 6, 31):
            shapes.clear()
            physics.gradients(obj, probe, win, kernel, inten, wave_checkpoints=c)
            scratch = [s for s in shapes if len(s) == 4]
            assert scratch == [(multislice.position_scratch_waves(slices, c), modes, N, N)], c
    # slices 1 .. 31 (keep all); 15 checkpoints + 1; 5 checkpoints + 5; one segment of 31 slots
    assert [multislice.position_scratch_waves(32, c) for c in (1, 2, 6, 31)] == [31, 16, 10, 31]
    assert multislice.position_scratch_waves(1, 1) == 1


@pytest.mark.parametrize("path", wc.PATHS)
def test_auto_keeps_every_wave_when_one_position_fits_else_the_least_fitting_interval(path):
    s, k, win = 100, 2, (64, 64)
    full = wc.gradient_working_set(s, k, win, 1, path)
    need = {c: wc.gradient_working_set(s, k, win, c, path) for c in range(2, s)}
    assert wc.wave_checkpoint_interval(s, k, win, full, path) == 1
    assert wc.wave_checkpoint_interval(s, k, win, math.inf, path) == 1
    for budget in (full - 1, full // 2, full // 4, min(need.values())):
        c = wc.wave_checkpoint_interval(s, k, win, budget, path)
        assert need[c] <= budget and all(need[x] > budget for x in range(2, c)), (budget, c)
    least = min(need.values())
    c = wc.wave_checkpoint_interval(s, k, win, least - 1, path)  # nothing fits: the least memory
    assert need[c] == least and all(need[x] > least for x in range(2, c))
    assert 5 <= c <= 12  # near sqrt(S)
    # one slice, or two: nothing to save
    assert wc.wave_checkpoint_interval(1, k, win, 0, path) == 1
    assert wc.wave_checkpoint_interval(2, k, win, 0, path) == 1


def test_working_sets_at_interval_one_are_the_keep_all_formulas():
    s, k, n2 = 100, 1, 1024 * 1024
    assert wc.gradient_working_set(s, k, (1024, 1024), 1, "batched") == (s * (k + 1) + 6 * k) * n2 * 8  # 1.73 GB
    assert wc.gradient_working_set(s, k, (1024, 1024), 1, "cuda") == ((s + 1) * k * 8 + 4) * n2
    assert wc.gradient_working_set(s, k, (1024, 1024), 1, "positions") == s * k * n2 * 8
    assert wc.gradient_working_set(s, k, (1024, 1024), 10, "cuda") == ((10 + 10) * k * 8 + 4) * n2
    assert wc.gradient_working_set(s, k, (1024, 1024), 100, "cuda") == wc.gradient_working_set(s, k, (1024, 1024), 1, "cuda")


def test_the_setting_is_read_and_checked():
    assert wc.configured_wave_checkpoints() == "auto"  # the default of daskptycho.yaml
    for value, expect in (("auto", "auto"), (None, "auto"), (3, 3), (np.int64(1), 1)):
        with dask.config.set({"daskptycho.reconstruct.wave_checkpoints": value}):
            assert wc.configured_wave_checkpoints() == expect
    with dask.config.set({"daskptycho.reconstruct.wave_checkpoints": 4}):
        assert wc.checkpoint_interval(32, 1, (64, 64), 0) == 4  # an integer is taken as it is
    for bad in (0, -2, 2.5, True, "sqrt", "4"):
        with dask.config.set({"daskptycho.reconstruct.wave_checkpoints": bad}), \
                pytest.raises(OptionsError, match="wave_checkpoints.*auto or an integer >= 1"):
            wc.configured_wave_checkpoints()
    with pytest.raises(ValueError):
        wc.segments(5, 0)
    assert wc.segments(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert wc.segments(7, 7) == wc.segments(7, 1) == [(s, s + 1) for s in range(7)]  # one segment: run as keep-all


def test_a_small_budget_makes_gradient_sum_checkpoint_with_the_same_result(monkeypatch):
    slices, modes = 12, 1
    obj, probe, corners, kernel, inten = _problem(slices, modes, j=6, seed=3)
    window = (N, N)
    full = wc.gradient_working_set(slices, modes, window, 1, "batched")
    small_mib = full / 2 / 2**20
    c = wc.wave_checkpoint_interval(slices, modes, window, small_mib * 2**20, "batched")
    assert c > 1
    # the chunk counts the working set of the interval the calls run
    big = 4 * full / 2**20
    with dask.config.set({"daskptycho.reconstruct.wave_checkpoints": 4}):
        assert positions_per_chunk(window, slices, modes, big) == int(big * 2**20 // wc.gradient_working_set(slices, modes, window, 4))
    assert positions_per_chunk(window, slices, modes, big) == 4  # auto: it fits, every wave kept
    assert positions_per_chunk(window, slices, modes, small_mib) == 1
    count = _CountFFTs(monkeypatch)
    select = np.arange(len(corners))
    with dask.config.set(PATHS["numpy"]):
        def run(budget):
            return gradient_sum(obj, probe, corners, window, kernel, inten, select, None, "amplitude", 2, True, budget_mib=budget)

        ref, f_ref = count(lambda: run(None))
        got, f_got = count(lambda: run(small_mib))
        with dask.config.set({"daskptycho.reconstruct.wave_checkpoints": 1}):
            _, f_one = count(lambda: run(small_mib))
    assert f_got - f_ref == 2 * modes * len(corners) * wc.recomputed_propagations(slices, c) > 0
    assert f_one == f_ref
    assert got["cost"] == ref["cost"]
    for key in KEYS:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_peak_memory_of_a_numpy_gradient_call_falls():
    """tracemalloc sees NumPy's array allocations: the peak of one call (accumulators made
    before) with the interval ``auto`` picks under a budget a third of one position's
    keep-all working set, against every wave kept."""
    slices, modes, n, j = 32, 1, 64, 8
    obj, probe, corners, kernel, inten = _problem(slices, modes, j=j, n=n, hw=(96, 96))
    window = (n, n)
    budget = wc.gradient_working_set(slices, modes, window, 1, "batched") / 3
    c = wc.checkpoint_interval(slices, modes, window, budget, "batched", setting="auto")
    assert c > 1
    win = physics.windows(corners, window, obj.shape[1:])
    out = {"object": np.zeros_like(obj), "illumination": np.zeros(obj.shape, np.float32),
           "probe": np.zeros_like(probe), "probe_illumination": np.zeros(window, np.float32)}
    peaks = {}
    with dask.config.set(PATHS["numpy"]):
        for interval in (1, c, 1, c):  # twice each: the first call plans the FFTs
            tracemalloc.start()
            try:
                physics.gradients(obj, probe, win, kernel, inten, out=out, wave_checkpoints=interval)
                peaks[interval] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    one = j * wc.gradient_working_set(slices, modes, window, 1, "batched")
    assert peaks[1] > 0.5 * one  # the keep-all call does hold its waves
    expected = wc.gradient_working_set(slices, modes, window, c, "batched") / wc.gradient_working_set(slices, modes, window, 1, "batched")
    assert expected < 0.34
    assert peaks[c] < 0.5 * peaks[1], (c, peaks)
