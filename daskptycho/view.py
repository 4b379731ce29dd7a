"""Pictures of results: phase and amplitude per slice, probe modes, cost curve, comparison with a truth.

:func:`figures` builds the matplotlib figures (for a notebook to show, or a test to
inspect); :func:`write_pngs` saves them as PNGs (``daskptycho view``).

Conventions of every picture: axes in physical units (nm, or µm for fields of
:data:`UM_FROM_M` and more), a colour bar with units on every image, and the object's
colour range taken from the scanned field (:func:`scanned_field`), which is outlined
and named in a legend. Outside the scanned field the object keeps its starting value
(or noise where only the probe's tails reached), which would otherwise set the range.
"""

from __future__ import annotations

import os
import re

import numpy as np

#: percentiles (of the values inside the scanned field) that set the object's colour range
PERCENTILES = (1.0, 99.0)
#: fields (or probe windows) at least this wide, metres, get axes in µm rather than nm
UM_FROM_M = 2e-6
#: the probe's phase is drawn where its amplitude is at least this fraction of the mode's peak
PROBE_PHASE_FLOOR = 0.1
#: the object pixels whose change from the start (1) exceeds this fraction of the largest
#: change are "reconstructed" (the last fallback field: no positions, no options to find them)
CHANGED_FRACTION = 0.05
FIELD_STYLE = {"edgecolor": "cyan", "linestyle": "--", "linewidth": 1.0, "fill": False}
DPI = 110


def _save(fig, path):
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    os.replace(tmp, path)  # never leave a half-written picture


def length_unit(span_m):
    """The unit for axes spanning ``span_m`` metres.

    Returns
    -------
    scale : float
        Multiply metres by it to get the unit (1e9 for nm, 1e6 for µm).
    name : str
        ``"nm"`` or ``"µm"``.
    """
    return (1e6, "µm") if span_m >= UM_FROM_M else (1e9, "nm")


def _extent(y, x, scale):
    """imshow extent (left, right, bottom, top) of pixel centres ``y``, ``x`` (metres, uniform
    steps): the image spans the pixels' edges, half a pixel beyond the first and last centre."""
    dy = float(y[1] - y[0]) if len(y) > 1 else 1.0
    dx = float(x[1] - x[0]) if len(x) > 1 else 1.0
    return ((x[0] - dx / 2) * scale, (x[-1] + dx / 2) * scale, (y[-1] + dy / 2) * scale, (y[0] - dy / 2) * scale)


def scan_positions(result, position=None):
    """The probe centres (J, 2) (y, x), metres: ``position`` if given, else the result's
    ``position`` variable if it has one, else None."""
    if position is not None:
        return np.asarray(position, dtype=np.float64)
    if "position" in result.variables:
        return np.asarray(result["position"].values, dtype=np.float64)
    return None


def scanned_field(result, position=None):
    """Where the reconstruction is meaningful, for colour ranges and the outline.

    Parameters
    ----------
    result : xarray.Dataset from :func:`daskptycho.reconstruct` or :func:`daskptycho.open_result`
    position : array (J, 2), metres, optional
        Probe centres (y, x); see :func:`scan_positions` for where they come from otherwise.

    Returns
    -------
    region : tuple (y_min, y_max, x_min, x_max), metres, or None
        The bounding box of the probe centres (:func:`daskptycho.metrics.scanned_region`,
        the field over which :func:`daskptycho.metrics.phase_correlation` is computed).
        Without positions, the same box from the object's grid: a reconstruction's grid
        (:func:`daskptycho.geometry.object_grid`) is the probe centres' box widened by
        half the probe window and the option ``pad_px`` on every side. A result without
        its options (written by another program): the bounding box of the pixels whose
        change from the starting object (ones) exceeds :data:`CHANGED_FRACTION` of the
        largest change. None when none of these exists.
    label : str
        What the region is, for a legend.
    """
    result["object"].load()
    return _field(result, scan_positions(result, position))


def _field(result, pos):
    """:func:`scanned_field` with the positions ``pos`` (J, 2) already looked up (or None)."""
    from .metrics import scanned_region

    if pos is not None and len(pos):
        return tuple(float(v) for v in scanned_region(pos)), "scanned field (probe centres)"
    region = _grid_field(result)
    if region is not None:
        return region, "scanned field (probe centres)"
    obj = result["object"]
    change = np.abs(obj.values - 1).max(axis=0)
    top = float(change.max()) if change.size else 0.0
    if not top > 0:
        return None, ""
    big = change > CHANGED_FRACTION * top
    rows, cols = np.flatnonzero(big.any(axis=1)), np.flatnonzero(big.any(axis=0))
    y, x = obj["y"].values, obj["x"].values
    return (float(y[rows[0]]), float(y[rows[-1]]), float(x[cols[0]]), float(x[cols[-1]])), "reconstructed field (where the object changed)"


def _grid_field(result):
    """The probe centres' box (y_min, y_max, x_min, x_max), metres, from the object grid, or None.

    :func:`daskptycho.geometry.object_grid` makes the grid ``span + window + 2 pad_px`` pixels
    wide with the first centre on pixel ``window // 2 + pad_px``, so the box is the grid less
    ``window // 2 + pad_px`` pixels at the start and ``window - 1 - window // 2 + pad_px`` at the
    end, per axis (window: the probe's (py, px); pad_px: from the ``options`` attribute).
    """
    import json

    try:
        pad = int(json.loads(result.attrs["options"])["pad_px"] or 0)
        window = (result.sizes["py"], result.sizes["px"])
    except (KeyError, TypeError, ValueError):
        return None
    box = []
    for name, n in zip(("y", "x"), window):
        c = np.asarray(result[name].values, dtype=np.float64)
        if c.size < 2:
            return None
        d = float(c[1] - c[0])
        lo, hi = c[0] + (n // 2 + pad) * d, c[-1] - (n - 1 - n // 2 + pad) * d
        if hi < lo - abs(d) / 2:  # not a grid made around probe windows
            return None
        box += [lo, hi]
    return tuple(float(v) for v in box)


def field_mask(y, x, region):
    """Boolean (len(y), len(x)): the pixels whose centres lie in ``region`` (metres), widened by
    half a pixel so a field narrower than a pixel (a line scan) still holds one."""
    y0, y1, x0, x1 = region
    hy = abs(float(y[1] - y[0])) / 2 if len(y) > 1 else 0.0
    hx = abs(float(x[1] - x[0])) / 2 if len(x) > 1 else 0.0
    return ((y >= y0 - hy) & (y <= y1 + hy))[:, None] & ((x >= x0 - hx) & (x <= x1 + hx))[None, :]


def robust_limits(values, percentiles=PERCENTILES):
    """(low, high) colour limits: the ``percentiles`` of the finite ``values``; a constant
    image gets a small range around its value so the colour bar still draws."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    lo, hi = (float(p) for p in np.percentile(v, percentiles))
    if not hi > lo:
        pad = max(abs(lo) * 1e-3, 1e-6)
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _outline(ax, region, scale, label):
    from matplotlib.patches import Rectangle

    y0, y1, x0, x1 = (v * scale for v in region)
    return ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, label=label, **FIELD_STYLE))


def cost_label(attrs):
    """A readable y label and a note for the cost curve, from the ``cost`` variable's attributes.

    ``long_name`` reads like ``"amplitude cost per iteration (before its update)"`` (ml, gd)
    or ``"Fourier error sum (sqrt(I_model) - sqrt(I))^2 of the model entering each
    iteration"`` (dm): the quantity's name goes to the label with the ``units``, the rest
    (when it is measured, the formula) to the note.

    Returns
    -------
    label : str
        e.g. ``"amplitude cost (counts)"``.
    note : str
        e.g. ``"each iteration's cost, before its update"``; may be empty.
    """
    long = " ".join(str(attrs.get("long_name") or "cost").split())
    units = str(attrs.get("units") or "")
    m = re.fullmatch(r"(.+?) per iteration \((.+)\)", long)
    if m:
        name, note = m[1], f"each iteration's cost, {m[2]}"
    else:
        # the label: what comes before a formula or a qualifier; the note: all of long_name
        cuts = [i for i in (long.find(" ("), long.find(" of "), long.find(" per ")) if i > 0]
        name, note = long[:min(cuts, default=len(long))], long
        note = "" if note == name else re.sub(r"sqrt\((\w+)\)", r"√\1", note).replace(")^2", ")²")
    return f"{name} ({_unit_text(units)})" if units and units != "1" else name, note


def _unit_text(units):
    """Units for a label in parentheses: ``sqrt(counts)`` reads √counts, so no doubled parenthesis."""
    return re.sub(r"sqrt\((\w+)\)", r"√\1", str(units))


def _ordinal(v):
    v = int(round(v))
    return f"{v}{'th' if 10 <= v % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(v % 10, 'th')}"


def _range_note():
    p0, p1 = PERCENTILES
    return f"colour range: the {_ordinal(p0)} to {_ordinal(p1)} percentile inside it"


def object_figure(result, kind="phase", position=None):
    """One row of panels, one per slice: the object's phase (rad) or amplitude (transmission).

    Parameters
    ----------
    result : xarray.Dataset with ``object`` (slice, y, x) complex and ``y``, ``x`` in metres
    kind : {"phase", "amplitude"}
    position : array (J, 2), metres, optional
        Probe centres (y, x); see :func:`scanned_field`.

    Returns
    -------
    matplotlib.figure.Figure
        Axes in nm (µm for wide fields); colour range: :data:`PERCENTILES` of the values inside
        the scanned field, which is outlined and named in the figure's legend.
    """
    from matplotlib.figure import Figure

    if kind not in ("phase", "amplitude"):
        raise ValueError(f"kind={kind!r}; expected 'phase' or 'amplitude'")
    obj = result["object"].load()
    region, field_label = _field(result, scan_positions(result, position))
    y, x = obj["y"].values, obj["x"].values
    scale, unit = length_unit(max(np.ptp(y), np.ptp(x)))
    extent = _extent(y, x, scale)
    n = obj.sizes["slice"]
    inside = field_mask(y, x, region) if region is not None else None
    fig = Figure(figsize=(3.4 * n + 0.8, 3.9), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    handle = None
    for s, ax in enumerate(axes):
        data = np.angle(obj.values[s]) if kind == "phase" else np.abs(obj.values[s])
        lo, hi = robust_limits(data[inside] if inside is not None and inside.any() else data)
        im = ax.imshow(data, extent=extent, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(f"{kind}, slice {s}")
        ax.set_xlabel(f"x ({unit})")
        ax.set_ylabel(f"y ({unit})")
        fig.colorbar(im, ax=ax, fraction=0.046, label="phase (rad)" if kind == "phase" else "amplitude (transmission)",
                     extend="both")
        if region is not None:
            handle = _outline(ax, region, scale, field_label)
    if handle is not None:
        fig.legend(handles=[handle], labels=[f"{field_label}; {_range_note()}"], loc="outside lower center",
                   fontsize="small", frameon=False)
    return fig


def probe_figure(result):
    """Amplitude (top row) and phase (bottom row) of every probe mode.

    Parameters
    ----------
    result : xarray.Dataset with ``probe`` (mode, py, px) complex (its ``units`` attribute,
        sqrt(counts), labels the amplitude), centred at pixel N//2, attribute ``pixel_size_m``
        (metres), and optionally ``probe_power_fraction`` (mode,)

    Returns
    -------
    matplotlib.figure.Figure
        Axes in nm (µm for wide windows) from the probe's centre; a colour bar on every panel.
    """
    import matplotlib
    from matplotlib.figure import Figure

    probe = result["probe"].values
    k, ny, nx = probe.shape
    fr = result["probe_power_fraction"].values if "probe_power_fraction" in result else np.full(k, 1 / k)
    dx = float(result.attrs.get("pixel_size_m") or abs(float(result["x"][1] - result["x"][0])))
    # the probe is centred at pixel N//2 (see the probe variable's long_name)
    py = (np.arange(ny) - ny // 2) * dx
    px = (np.arange(nx) - nx // 2) * dx
    scale, unit = length_unit(max(ny, nx) * dx)
    extent = _extent(py, px, scale)
    units = str(result["probe"].attrs.get("units") or "arbitrary units")
    cyclic = matplotlib.colormaps["twilight"].with_extremes(bad="black")
    fig = Figure(figsize=(3.3 * k + 0.6, 6.0), layout="constrained")
    axes = fig.subplots(2, k, squeeze=False)
    for m in range(k):
        amp = np.abs(probe[m])
        im = axes[0, m].imshow(amp, extent=extent, cmap="magma", vmin=0, vmax=float(amp.max()) or 1.0, interpolation="nearest")
        axes[0, m].set_title(f"mode {m}: {100 * fr[m]:.1f}% of the power")
        fig.colorbar(im, ax=axes[0, m], fraction=0.046, label=f"amplitude ({_unit_text(units)})")
        # the phase where the probe is ~0 is noise: black it out (black is not in the cyclic map)
        phase = np.ma.masked_where(amp < PROBE_PHASE_FLOOR * amp.max(), np.angle(probe[m]))
        im = axes[1, m].imshow(phase, extent=extent, cmap=cyclic, vmin=-np.pi, vmax=np.pi, interpolation="nearest")
        axes[1, m].set_title(f"mode {m}: phase")
        cb = fig.colorbar(im, ax=axes[1, m], fraction=0.046, label="phase (rad)")
        cb.set_ticks([-np.pi, -np.pi / 2, 0, np.pi / 2, np.pi], labels=["-π", "-π/2", "0", "π/2", "π"])
        for a in axes[:, m]:
            a.set_xlabel(f"x ({unit})")
            a.set_ylabel(f"y ({unit})")
    # two lines: the figure of a single mode is narrow
    fig.suptitle(f"probe modes, pixel {dx * 1e9:.3g} nm\nphase where the amplitude is at least "
                 f"{100 * PROBE_PHASE_FLOOR:g}% of the mode's peak, black elsewhere", fontsize="medium")
    return fig


def cost_figure(result):
    """The cost of every iteration (log scale), labelled from the ``cost`` variable's attributes
    (:func:`cost_label`)."""
    from matplotlib.figure import Figure

    label, note = cost_label(result["cost"].attrs)
    fig = Figure(figsize=(5.2, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.semilogy(result["iteration"].values, result["cost"].values, "o-", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel(label)
    if note:
        ax.set_title(note, fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def truth_figure(result, truth, position=None):
    """Projected phase (rad, summed over slices) of the truth and of the reconstruction, side by side.

    Parameters
    ----------
    result : xarray.Dataset with ``object`` (slice, y, x) complex, ``y``, ``x`` in metres
    truth : xarray.DataArray (slice, y, x) complex, coordinates in metres
    position : array (J, 2), metres, optional
        Probe centres (y, x): the outlined scanned field, where the correlation r is computed
        (:func:`daskptycho.metrics.phase_correlation`; stated in the legend when positions are
        known); see :func:`scanned_field`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    from .metrics import phase_correlation, projected_phase

    obj = result["object"].load()
    position = scan_positions(result, position)
    region, field_label = _field(result, position)
    t = truth.load()
    panels = ((projected_phase(t), "truth"), (projected_phase(obj), "reconstruction"))
    span = max(max(np.ptp(d["y"].values), np.ptp(d["x"].values)) for d, _ in panels)
    scale, unit = length_unit(span)
    fig = Figure(figsize=(9.4, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    handle = None
    for ax, (data, title) in zip(axes, panels):
        y, x = data["y"].values, data["x"].values
        inside = field_mask(y, x, region) if region is not None else None
        lo, hi = robust_limits(data.values[inside] if inside is not None and inside.any() else data.values)
        im = ax.imshow(data.values, extent=_extent(y, x, scale), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(f"projected phase, {title}")
        ax.set_xlabel(f"x ({unit})")
        ax.set_ylabel(f"y ({unit})")
        fig.colorbar(im, ax=ax, fraction=0.046, label="projected phase (rad)", extend="both")
        if region is not None:
            handle = _outline(ax, region, scale, field_label)
    if handle is not None:
        # the correlation (metrics.phase_correlation) is taken over the probe centres' box; the
        # fallback field of a result without its options is another box, so it is not named so
        scanned = field_label.startswith("scanned field")
        text = f"{field_label}: where the correlation r with the truth is computed" if scanned else field_label
        if position is not None:
            r, rms = phase_correlation(obj, truth, position)
            text += f"\n(r = {r:.4f}, RMS error {rms:.3g} rad after removing the constant offset); {_range_note()}"
        else:
            text += f"\n{_range_note()}"
        fig.legend(handles=[handle], labels=[text], loc="outside lower center", fontsize="small", frameon=False)
    return fig


def figures(result, truth=None, position=None):
    """The pictures of a result, as matplotlib figures (not registered with pyplot).

    Parameters
    ----------
    result : xarray.Dataset
        From :func:`daskptycho.reconstruct` or :func:`daskptycho.open_result`: ``object``
        (slice, y, x) complex, ``probe`` (mode, py, px) complex in sqrt(counts), ``cost``
        (iteration,), coordinates ``y``, ``x`` in metres, attribute ``pixel_size_m``.
    truth : xarray.DataArray (slice, y, x), optional
        The true object (a simulated store's ``truth_object``), coordinates in metres;
        adds ``"truth_comparison"``.
    position : array (J, 2), metres, optional
        Probe centres (y, x): the scanned field (see :func:`scanned_field`, which finds it
        without them too) and the correlation with the truth (stated only with them).

    Returns
    -------
    dict of str to matplotlib.figure.Figure
        ``"object_phase"``, ``"object_amplitude"``, ``"probe_modes"``, ``"cost"`` and, with
        ``truth``, ``"truth_comparison"``.
    """
    result["object"].load()  # once, for all the pictures
    pos = scan_positions(result, position)
    out = {f"object_{kind}": object_figure(result, kind, pos) for kind in ("phase", "amplitude")}
    out["probe_modes"] = probe_figure(result)
    out["cost"] = cost_figure(result)
    if truth is not None:
        out["truth_comparison"] = truth_figure(result, truth, pos)
    return out


def write_pngs(result, out_dir, truth=None, position=None):
    """Write the pictures of :func:`figures` as PNGs into ``out_dir``.

    Parameters
    ----------
    result : xarray.Dataset from :func:`daskptycho.reconstruct` or :func:`daskptycho.open_result`
    out_dir : str or path-like
        Created if missing; files ``<name>.png`` for every figure name.
    truth : xarray.DataArray (slice, y, x), optional; adds ``truth_comparison.png``
    position : array (J, 2), metres, optional; the probe centres (y, x), which set the
        scanned field that is outlined and sets the colour ranges

    Returns
    -------
    list of str
        The paths written.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in figures(result, truth=truth, position=position).items():
        p = os.path.join(out_dir, f"{name}.png")
        _save(fig, p)
        paths.append(p)
    return paths
