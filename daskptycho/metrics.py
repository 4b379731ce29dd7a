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


def error_map(obj: xr.DataArray, truth: xr.DataArray, position, margin_m=0.0):
    """Per-pixel reconstruction error over the scanned field.

    ``|O e^{-i phi_s} - T|`` summed over slices, where ``phi_s`` is the best constant
    phase of slice ``s`` (the one unobservable offset), on the truth's pixels.
    """
    o, t = _on_truth_grid(obj, truth, scanned_region(position, margin_m))
    o, t = o.load().values, t.load().values
    err = np.zeros(o.shape[-2:])
    for s in range(o.shape[0]):
        phase = np.angle(np.vdot(o[s], t[s]))  # argmin over a constant phase
        err += np.abs(o[s] * np.exp(1j * phase) - t[s])
    return err


def registered_error(obj: xr.DataArray, truth: xr.DataArray, position, reach=3):
    """Mean :func:`error_map` and :func:`phase_correlation` at the best whole-pixel
    registration of ``obj`` on ``truth``.

    A scan's common translation is free (the object moves with it) and the grid of a
    reconstruction from perturbed (or refined) positions lies a fraction of a pixel off the
    truth's lattice: the result's pixels are put on the truth's lattice, then shifted by up to
    ``reach`` pixels each way, and the shift of least error is kept.

    Returns
    -------
    (error, correlation, (dy, dx)) : float, float, (int, int) pixels; None if no shift
    leaves the scanned field inside the result.
    """
    dx = float(truth.y[1] - truth.y[0])
    y0, x0 = float(truth.y[0]), float(truth.x[0])
    y = y0 + np.rint((obj.y.values - y0) / dx) * dx
    x = x0 + np.rint((obj.x.values - x0) / dx) * dx
    best = None
    for a in range(-reach, reach + 1):
        for b in range(-reach, reach + 1):
            o = obj.assign_coords(y=y + a * dx, x=x + b * dx)
            try:
                e = float(error_map(o, truth, position).mean())
            except KeyError:  # shifted beyond the result's grid
                continue
            if best is None or e < best[0]:
                best = (e, phase_correlation(o, truth, position)[0], (a, b))
    return best


def seam_ratio(result, truth: xr.DataArray, position, width_px=2):
    """Reconstruction error within ``width_px`` of internal tile borders divided by
    the error elsewhere, over the scanned field (1 = no seams).

    Parameters
    ----------
    result : xarray.Dataset from a tiled engine (its ``tile_cores`` attribute gives the borders)
    """
    import json

    cores = json.loads(result.attrs["tile_cores"])
    rows = sorted({v[0] for v in cores.values()} - {0})
    cols = sorted({v[2] for v in cores.values()} - {0})
    region = scanned_region(position)
    o, t = _on_truth_grid(result["object"], truth, region)
    err = error_map(result["object"], truth, position)
    # global pixel indices of the compared pixels
    y = np.rint((o["y"].values - result["y"].values[0]) / (result["y"].values[1] - result["y"].values[0])).astype(int)
    x = np.rint((o["x"].values - result["x"].values[0]) / (result["x"].values[1] - result["x"].values[0])).astype(int)
    near = np.zeros(err.shape, bool)
    for e in rows:  # a border between pixel rows e-1 and e
        near |= (np.abs(y - e + 0.5) <= width_px)[:, None]
    for e in cols:
        near |= (np.abs(x - e + 0.5) <= width_px)[None, :]
    if not near.any() or near.all():
        return float("nan")
    return float(err[near].mean() / err[~near].mean())


#: a group of costs whose next cost came less than this share of the run's mean time per
#: iteration after it was fetched with that next cost: no boundary to measure from
BURST_GAP = 0.05


def steady_span(intervals, skip=2, burst_ends=None):
    """The arrivals a steady-state time per iteration is measured between.

    Parameters
    ----------
    intervals : sequence of float
        Seconds between the arrivals of consecutive iterations' costs (the first from the start).
    skip : int
        Iterations left out at least: the first carries the start (loading, warm-up), and
        with one iteration kept in flight the second's cost arrives right after the first's.
    burst_ends : iterable of int, optional
        Where it is known (a run's ``peer_block_ends``): the indices (into ``intervals``) of
        the last cost of each group of costs that arrived together. The span then runs from
        the first of them at or after ``skip - 1`` whose next cost came later (more than
        :data:`BURST_GAP` of the mean time per iteration after it) to the last cost.

    Returns
    -------
    (a, b) : 0-based indices of two iterations whose costs' arrivals bound the span (the
    iterations ``a + 1 .. b`` are averaged), or None when no steady span exists.

    The span starts where a burst ends. Costs computed together arrive together (a peer
    block's 16, handed to the caller one by one within milliseconds): a span that started
    inside such a burst would count the burst's iterations as if they had cost nothing.
    With ``burst_ends`` the span starts at the first of them at or after ``skip - 1``;
    without, at ``skip - 1`` (costs that arrive one by one, or in the pairs of a run that
    keeps one iteration in flight, which ``skip`` covers). The last cost always ends one.
    A group's end is no boundary when the next group's costs came right behind it: a client
    busy elsewhere (one worker sharing its cores with the client) fetches several blocks'
    costs at once, and a span starting inside them would count a whole block as free.
    """
    xs = [float(x) for x in intervals]
    n = len(xs)
    if n <= skip or n < 2:
        return None
    if burst_ends is not None:
        mean = sum(xs[1:]) / (n - 1)
        starts = [int(e) for e in burst_ends if max(skip - 1, 0) <= int(e) < n - 1 and xs[int(e) + 1] > BURST_GAP * mean]
        return (min(starts), n - 1) if starts else None
    return max(skip - 1, 0), n - 1


def steady_iteration_s(intervals, skip=2, burst_ends=None):
    """Wall seconds per iteration in the steady state: the wall time between the arrivals
    of two costs that each end a burst, over the iterations between (:func:`steady_span`).

    Parameters
    ----------
    intervals : sequence of float
        Seconds between the arrivals of consecutive iterations' costs (the first from the start).
    skip : int
        Iterations left out at least (see :func:`steady_span`).
    burst_ends : iterable of int, optional
        See :func:`steady_span`.

    A rate over a span, not the median of single intervals: the costs of a pipelined or
    blocked run arrive in bursts (0.02 s, then 1.1 s; or 16 within milliseconds, then 0.4
    s), so single intervals are no per-iteration times. Without a steady span (too few
    iterations, or all after the start in one burst): the whole run's mean, start included
    (an upper bound, never the milliseconds between the costs of one burst).
    """
    xs = [float(x) for x in intervals]
    if not xs:
        raise ValueError("no iterations")
    span = steady_span(xs, skip, burst_ends)
    if span is None:
        return sum(xs) / len(xs)
    a, b = span
    return sum(xs[a + 1:b + 1]) / (b - a)
