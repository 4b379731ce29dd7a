"""Comparisons of a reconstruction with a known truth."""

from __future__ import annotations

import numpy as np
import xarray as xr


def scanned_region(position, margin_m=0.0):
    """(y_min, y_max, x_min, x_max) of the probe centres, metres."""
    p = np.asarray(position)
    return (p[:, 0].min() - margin_m, p[:, 0].max() + margin_m, p[:, 1].min() - margin_m, p[:, 1].max() + margin_m)


def _on_truth_grid(obj: xr.DataArray, truth: xr.DataArray, region):
    y0, y1, x0, x1 = region
    dx = float(truth["y"][1] - truth["y"][0])
    t = truth.sel(y=slice(y0 - dx / 2, y1 + dx / 2), x=slice(x0 - dx / 2, x1 + dx / 2))
    o = obj.sel(y=t["y"], x=t["x"], method="nearest", tolerance=dx / 10)
    return o, t


def projected_phase(obj: xr.DataArray) -> xr.DataArray:
    """Phase summed over slices (the projected phase), radians."""
    obj = obj.load()
    return obj.copy(data=np.angle(obj.values)).sum("slice")


def phase_correlation(obj: xr.DataArray, truth: xr.DataArray, position, margin_m=0.0):
    """Pearson r of the projected phase over the scanned field.

    Pearson's r is invariant to a constant phase offset, which is removed anyway.
    The reconstruction is matched to the truth by coordinates (metres), so a
    misregistered result scores low.

    Returns
    -------
    r : float
    rms : float
        RMS phase error (rad) after removing the mean offset.
    """
    o, t = _on_truth_grid(obj, truth, scanned_region(position, margin_m))
    a = projected_phase(o).values.ravel()
    b = projected_phase(t).values.ravel()
    a = a - a.mean()
    b = b - b.mean()
    r = float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
    return r, float(np.sqrt(np.mean((a - b) ** 2)))
