"""Scan-position refinement by the cost of each position's own pattern.

The forward model cuts every probe window at an integer corner; a position's
continuous estimate (float pixels) is refined by evaluating that position's cost (the
engine's cost: amplitude or Poisson, with the detector mask) with its window at the
current integer corner and at +-1 pixel along y and x, fitting a parabola per axis
through the three costs, and moving the estimate a damped step towards the
parabola's minimum. Only forward passes are needed (no adjoint), vectorised over
positions and offsets in chunks.

Everything here acts on the positions it is given and the object array it is given
(the whole object or one tile's patch, with corners on that array's grid): no global
state, so a tile can refine its own positions. No common shift is removed during a
refinement: the windows are whole pixels, so the object grid itself pins the scan's
translation (and removing the continuous mean shift was measured to pull regions of a
scan onto neighbouring pixels, docs/position-correction.md). :func:`remove_mean_shift`
is for comparing refined positions with a truth.

Coordinates: a position's estimate is the probe centre in *pixel coordinates* of the
object array (row, col; the centre of pixel ``(i, j)`` is ``(i, j)``), as
:meth:`daskptycho.geometry.ObjectGrid.pixel_coordinates` gives; its window's top-left
corner is ``rint(estimate) - N // 2`` (:meth:`~daskptycho.geometry.ObjectGrid.window_corners`).

Every function works on NumPy or CuPy object and probe arrays alike; positions,
corners and the returned costs are NumPy arrays (host memory: they are small).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_numpy
from .intensity import abs2_modes
from .multislice import forward, windows

# the floor under the model intensity in the Poisson cost's log, as in physics.cost
_TINY = 1e-30

__all__ = ["STENCIL", "position_margin_px", "window_corners_of", "per_position_cost", "position_costs", "parabolic_minimum",
           "refine_positions", "search_positions", "keep_on_object", "remove_mean_shift"]

#: The offsets (pixels, (dy, dx)) whose costs :func:`refine_positions` evaluates: the
#: current window, then -1 and +1 along y, then -1 and +1 along x.
STENCIL = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)


def position_margin_px(max_shift_px):
    """Pixels of object grid a refinement needs beyond the windows of the starting
    positions: ``ceil(max_shift_px) + 1`` (the shift, and the stencil's pixel beyond it)."""
    return int(np.ceil(max_shift_px)) + 1


def window_corners_of(estimate, window):
    """Integer window corners (J, 2) of continuous probe-centre estimates (J, 2), pixels.

    ``rint(estimate) - N // 2`` per axis, as
    :meth:`~daskptycho.geometry.ObjectGrid.window_corners` rounds positions.
    """
    return np.rint(np.asarray(estimate, dtype=np.float64)).astype(np.int64) - np.asarray(window, dtype=np.int64) // 2


def per_position_cost(far, intensity, mask=None, cost="amplitude"):
    """The cost of each position: :func:`~daskptycho.physics.cost.amplitude_cost` or
    :func:`~daskptycho.physics.cost.poisson_cost` summed per position, not over them.

    Parameters
    ----------
    far : complex array (J, K, N_y, N_x)
        Far-field waves (FFT order), e.g. from :func:`~daskptycho.physics.multislice.forward`.
    intensity : real array (J, N_y, N_x)
        Measured patterns, FFT order, counts.
    mask : bool array (N_y, N_x) or None
        Valid detector pixels, FFT order.
    cost : {"amplitude", "poisson"}

    Returns
    -------
    float64 array (J,), counts (amplitude) or negative log-likelihood (Poisson)
    """
    xp = get_array_module(far)
    if cost not in ("amplitude", "poisson"):
        raise ValueError(f"cost must be 'amplitude' or 'poisson', got {cost!r}")
    r = abs2_modes(far, xp)  # a new (J, N_y, N_x) array: the work space of the passes below
    if cost == "amplitude":
        xp.sqrt(r, out=r)
        r -= xp.sqrt(intensity)
        r *= r
    else:
        r -= intensity * xp.log(r + _TINY)
    if mask is not None:
        r *= mask
    return to_numpy(xp.sum(r, axis=(-2, -1), dtype=xp.float64))


def position_costs(obj, probe, corners, kernel, intensity, offsets=STENCIL, mask=None, cost="amplitude", chunk=64):
    """The cost of each position with its window moved by each offset.

    Parameters
    ----------
    obj : complex array (S, H, W)
        The object (or a tile's patch of it) the windows are cut from.
    probe : complex array (K, N_y, N_x)
    corners : int array (J, 2)
        Each position's window corner (row, col) on ``obj``'s grid, pixels.
    kernel : complex array (N_y, N_x) or None
        Fresnel transfer function between slices (FFT order).
    intensity : real array (J, N_y, N_x)
        Each position's measured pattern, FFT order, counts (same array module as ``obj``).
    offsets : int array (M, 2)
        Window shifts (dy, dx) in pixels; default :data:`STENCIL`.
    mask : bool array (N_y, N_x) or None
        Valid detector pixels, FFT order.
    cost : {"amplitude", "poisson"}
    chunk : int
        Windows (position-offset pairs) per vectorised forward call: bounds the
        transient memory to about ``chunk * (S + 2) * K * N_y * N_x`` complex values.

    Returns
    -------
    float64 array (J, M)
        ``costs[j, m]``: position ``j``'s cost with its window at ``corners[j] + offsets[m]``;
        ``inf`` where that window leaves ``obj``.
    """
    if cost not in ("amplitude", "poisson"):
        raise ValueError(f"cost must be 'amplitude' or 'poisson', got {cost!r}")
    xp = get_array_module(obj, probe)
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    window = tuple(int(v) for v in probe.shape[-2:])
    if intensity.shape[1:] != window or intensity.shape[0] != corners.shape[0]:
        raise ValueError(f"intensity must be (J, N_y, N_x) = {(corners.shape[0],) + window}, got {tuple(intensity.shape)}")
    j, m = corners.shape[0], offsets.shape[0]
    # every (position, offset) pair as one window: pair p is position p // M, offset p % M
    shifted = (corners[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
    h, w = obj.shape[-2:]
    inside = np.flatnonzero((shifted.min(axis=1) >= 0) & (shifted[:, 0] + window[0] <= h) & (shifted[:, 1] + window[1] <= w))
    out = np.full(j * m, np.inf)
    chunk = max(int(chunk), 1)
    for start in range(0, inside.size, chunk):
        pairs = inside[start:start + chunk]
        far = forward(obj, probe, windows(shifted[pairs], window, (h, w)), kernel)
        out[pairs] = per_position_cost(far, intensity[xp.asarray(pairs // m)], mask, cost)
        del far
    return out.reshape(j, m)


def parabolic_minimum(costs, max_step_px=1.0, min_curvature=1e-9):
    """Sub-pixel minimum of each position's cost from its :data:`STENCIL` costs.

    Per axis, the parabola through the costs at -1, 0, +1 pixel has its vertex at
    ``(c[-1] - c[+1]) / (2 (c[-1] + c[+1] - 2 c[0]))``.

    Parameters
    ----------
    costs : float array (J, 5)
        Costs at the offsets of :data:`STENCIL` (from :func:`position_costs`).
    max_step_px : float
        The vertex is clipped to ``[-max_step_px, max_step_px]`` per axis (beyond the
        stencil the parabola is an extrapolation).
    min_curvature : float
        Least curvature accepted, relative to the cost at the evaluated window: the
        second difference ``c[-1] + c[+1] - 2 c[0]`` must exceed ``min_curvature * c[0]``
        (the default: positive beyond rounding).

    Returns
    -------
    shift : float64 array (J, 2)
        The vertex (dy, dx) relative to the evaluated window, pixels; 0 where rejected.
    accepted : bool array (J, 2)
        Per axis: the three costs are finite and the curvature exceeds ``min_curvature``
        times the cost (a clear minimum, not a maximum or a flat line).
    """
    c = np.asarray(costs, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != len(STENCIL):
        raise ValueError(f"costs must be (J, {len(STENCIL)}) at the offsets of STENCIL, got {c.shape}")
    c0 = c[:, 0:1]
    minus, plus = c[:, [1, 3]], c[:, [2, 4]]
    curvature = minus + plus - 2 * c0
    accepted = np.isfinite(curvature) & (curvature > min_curvature * np.maximum(np.abs(c0), _TINY))
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(accepted, (minus - plus) / (2 * np.where(accepted, curvature, 1.0)), 0.0)
    return np.clip(vertex, -max_step_px, max_step_px), accepted


def refine_positions(obj, probe, kernel, intensity, estimate, start, mask=None, cost="amplitude", max_shift_px=2.0,
                     step=0.5, max_step_px=1.0, min_curvature=1e-9, chunk=64):
    """One refinement of a set of positions against ``obj`` (a whole object or a tile's patch).

    Each position's cost is evaluated at its current window (``rint(estimate)``) and
    +-1 pixel along y and x (:func:`position_costs`); the parabola's vertex per axis
    (:func:`parabolic_minimum`) is the target, and the estimate moves ``step`` of the
    way towards it. Axes whose curvature is not positive (a maximum or a flat line, or a
    window off ``obj``) keep their estimate. The new
    estimate stays within ``max_shift_px`` of ``start`` per axis and its window on ``obj``.

    Parameters
    ----------
    obj : complex array (S, H, W)
        The object the windows are cut from (only read).
    probe : complex array (K, N_y, N_x)
    kernel : complex array (N_y, N_x) or None
        Fresnel transfer function between slices.
    intensity : real array (J, N_y, N_x)
        The positions' patterns, FFT order, counts.
    estimate : float array (J, 2)
        Current probe-centre estimates, pixel coordinates of ``obj`` (row, col).
    start : float array (J, 2)
        The positions before any refinement, same coordinates: the reference of ``max_shift_px``.
    mask : bool array (N_y, N_x) or None
        Valid detector pixels, FFT order.
    cost : {"amplitude", "poisson"}
        The engine's cost.
    max_shift_px : float
        Most a position may move from ``start``, per axis, pixels.
    step : float
        Fraction of the way to the parabola's vertex taken (0 < step <= 1): damps the
        noise of single estimates and the coupling with the object's own update.
    max_step_px : float
        Largest vertex offset trusted per axis, pixels (the stencil's reach).
    min_curvature : float
        Least curvature relative to the cost (see :func:`parabolic_minimum`).
    chunk : int
        Windows per vectorised forward call (see :func:`position_costs`).

    Returns
    -------
    float64 array (J, 2)
        The refined estimates, pixel coordinates of ``obj``.
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    start = np.asarray(start, dtype=np.float64)
    if estimate.ndim != 2 or estimate.shape[1] != 2 or start.shape != estimate.shape:
        raise ValueError(f"estimate and start must both be (J, 2) pixel coordinates, got {estimate.shape} and {start.shape}")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step!r}")
    window = np.asarray(probe.shape[-2:], dtype=np.int64)
    centre = np.rint(estimate)
    costs = position_costs(obj, probe, window_corners_of(estimate, window), kernel, intensity, STENCIL, mask, cost, chunk)
    shift, accepted = parabolic_minimum(costs, max_step_px, min_curvature)
    target = centre + shift
    new = np.where(accepted, estimate + step * (target - estimate), estimate)
    new = np.clip(new, start - max_shift_px, start + max_shift_px)
    return keep_on_object(new, window, obj.shape[-2:])


def search_positions(obj, probe, kernel, intensity, estimate, start, radius_px, mask=None, cost="amplitude", max_shift_px=None,
                     chunk=64):
    """Move each position to the whole-pixel window of least cost within ``radius_px``.

    The parabolic step of :func:`refine_positions` only goes downhill from the current
    window, and a position's cost has a basin only about as wide as the probe's finest
    structure (a few pixels): a position that starts farther off walks the wrong way.
    One search over the square of ``(2 radius_px + 1)^2`` windows around each position,
    on an object already formed by its neighbours, brings every position into its basin.

    Parameters
    ----------
    obj, probe, kernel, intensity, mask, cost, chunk :
        As for :func:`refine_positions`.
    estimate, start : float array (J, 2)
        Current and starting probe centres, pixel coordinates of ``obj``.
    radius_px : int
        Half-width of the searched square, pixels (``(2 r + 1)^2`` forward passes per position).
    max_shift_px : float, optional
        Windows farther than this from ``start`` (per axis) are not considered.

    Returns
    -------
    float64 array (J, 2)
        ``rint(estimate)`` moved to the best window; the estimate itself where the
        current window is the best.
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    start = np.asarray(start, dtype=np.float64)
    r = int(radius_px)
    offsets = np.array([(a, b) for a in range(-r, r + 1) for b in range(-r, r + 1)], dtype=np.int64)
    offsets = offsets[np.argsort(np.abs(offsets).sum(axis=1), kind="stable")]  # the current window first: ties keep it
    window = np.asarray(probe.shape[-2:], dtype=np.int64)
    centre = np.rint(estimate)
    costs = position_costs(obj, probe, window_corners_of(estimate, window), kernel, intensity, offsets, mask, cost, chunk)
    if max_shift_px is not None:
        far = np.abs(centre[:, None, :] + offsets[None] - start[:, None, :]).max(axis=2) > max_shift_px
        costs[far] = np.inf
    best = np.argmin(costs, axis=1)
    moved = best != 0
    new = estimate.copy()
    new[moved] = centre[moved] + offsets[best[moved]]
    return keep_on_object(new, window, obj.shape[-2:])


def keep_on_object(estimate, window, object_shape):
    """The estimates clipped so that every window of ``rint(estimate)`` lies on the object.

    Parameters
    ----------
    estimate : float array (J, 2)
        Probe centres, pixel coordinates.
    window : (int, int)
        (N_y, N_x).
    object_shape : (int, int)
        (H, W) of the object (or patch) the windows are cut from.

    Returns
    -------
    float64 array (J, 2)
        Centres within ``[N // 2, H - N + N // 2]`` per axis (integer bounds, which
        ``rint`` keeps).
    """
    window = np.asarray(window, dtype=np.int64)
    lo = window // 2
    hi = np.asarray(object_shape, dtype=np.int64) - window + window // 2
    if np.any(hi < lo):
        raise ValueError(f"a {tuple(window)} window does not fit on an object of {tuple(object_shape)} pixels")
    return np.clip(np.asarray(estimate, dtype=np.float64), lo, hi)


def remove_mean_shift(estimate, start):
    """The estimates with the shift every position shares removed (the mean of
    ``estimate - start``): translating the whole scan together with the object changes
    no pattern, so comparisons of positions with a truth leave that shift out.

    Parameters
    ----------
    estimate, start : float array (J, 2), pixels

    Returns
    -------
    float64 array (J, 2)
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    return estimate - (estimate - np.asarray(start, dtype=np.float64)).mean(axis=0)
