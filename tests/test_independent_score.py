"""The independent quality benchmark's scorer (benchmarks/independent.py: score_object)."""

from __future__ import annotations

import os
import sys

import numpy as np
import xarray as xr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks

from benchmarks.independent import score_object  # noqa: E402

DX = 1e-9


def _object(values, y0=0.0, x0=0.0):
    s, h, w = values.shape
    return xr.DataArray(values.astype(np.complex64), dims=("slice", "y", "x"),
                        coords={"y": y0 + DX * np.arange(h), "x": x0 + DX * np.arange(w), "slice": np.arange(s)})


def _case(slices=1, scale=4.0):
    rng = np.random.default_rng(1)
    phase = rng.uniform(0, scale / slices, (slices, 40, 40))
    truth = _object(np.exp(1j * phase))
    position = np.array([[10, 10], [10, 29], [29, 10], [29, 29]]) * DX
    return phase, truth, position


def test_shift_offset_and_wraps_are_free():
    # phases up to 4 rad: they wrap in one slice; a 2-pixel shift and a constant phase are not errors
    phase, truth, position = _case()
    moved = _object(np.exp(1j * (phase + 0.9)), y0=2 * DX, x0=-1 * DX)
    s = score_object(moved, truth, position)
    assert s["phase_nrmse"] < 1e-5 and s["complex_error"] < 1e-5 and s["phase_r"] > 0.99999
    assert s["shift_px"] == [-2, 1]
    assert s["phase_nrmse_unwrapped"] > 0.1  # the wraps count without the wrapping


def test_flat_phase_scores_one_and_noise_in_between():
    phase, truth, position = _case(slices=3, scale=2.0)
    flat = score_object(_object(np.ones_like(phase)), truth, position, reach=0)
    assert abs(flat["phase_nrmse"] - 1) < 0.05 and abs(flat["phase_nrmse_unwrapped"] - 1) < 1e-6
    noisy = phase + np.random.default_rng(2).normal(0, 0.05, phase.shape)
    s = score_object(_object(np.exp(1j * noisy)), truth, position)
    assert 0.05 < s["phase_nrmse"] < 0.3 and s["shift_px"] == [0, 0]
    assert abs(s["phase_nrmse"] - s["phase_nrmse_unwrapped"]) < 1e-3  # slices below pi: the same
