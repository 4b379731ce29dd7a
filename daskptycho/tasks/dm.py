"""Tasks of the multi-mode difference map, run on the worker owning a part."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import array_module, get_array_module, is_gpu, to_numpy
from ..physics import cuda, dm, window_index
from ..physics.probe import orthogonalize_modes_with_mixing
from .updates import working_set_budget


@dataclass
class DMContext:
    """What every part task needs (small, broadcast once).

    Attributes
    ----------
    corners : dict ``{part: int array (J_p, 2)}``, window corners relative to the part's region
    regions : dict ``{part: (y0, y1, x0, x1)}``, the object region each part's windows touch
    grid_shape : (H, W) of the whole object
    beta : float, the relaxation of the view update (0 < beta <= 1)
    view_update : {"raar", "dm"}, the view update (:data:`daskptycho.physics.dm.VIEW_UPDATES`)
    """

    mask: np.ndarray | None
    window: tuple
    corners: dict
    regions: dict
    grid_shape: tuple
    beta: float = 0.8
    view_update: str = "raar"
    regularization: float = 1e-3
    device: str = "cpu"
    working_set: tuple = (32, 0.25)  # (cap in MiB, fraction of the part's state) per vectorised call


def _index(ctx, part, shape, xp):
    return window_index(ctx.corners[part], ctx.window, shape, xp)


def init_views(probe, crop, ctx: DMContext, part):
    """Starting views ``P O`` of a part: (J_p, K, L, N, N)."""
    xp = get_array_module(crop)
    probe = xp.asarray(probe)
    corners = ctx.corners[part]
    views = xp.empty((len(corners), probe.shape[0], crop.shape[0]) + tuple(ctx.window), dtype=crop.dtype)
    chunk = max(1, int(32 * 2**20 // max(views[0].nbytes * 2, 1)))
    for start in range(0, len(corners), chunk):  # filled in chunks: no view-sized temporaries
        sl = slice(start, start + chunk)
        views[sl] = dm.exit_waves(probe, crop, window_index(corners[sl], ctx.window, crop.shape[-2:], xp))
    return views


def initial_object(shape, start=None):
    """The starting object (L, H, W): ones, and weak (0.1) extra modes so they can grow;
    or ``start``, a given starting object (host array (L, H, W))."""
    if start is not None:
        return np.array(start, dtype=np.complex64)
    obj = np.ones(shape, np.complex64)
    obj[1:] *= 0.1
    return obj


def initial_crop(shape, region, device="cpu", start=None):
    """A part's crop of :func:`initial_object` (L, h, w), made on its worker from the shape
    alone, or ``start``, that crop of a given starting object (host array (L, h, w))."""
    y0, y1, x0, x1 = region
    return array_module(device).asarray(initial_object((shape[0], y1 - y0, x1 - x0), start))


def crop_object(obj_or_update, region=None, device="cpu"):
    """The part of the object a part's windows touch (a copy, in ``device``'s memory);
    ``region`` None: all of it (a crop cut elsewhere, copied where it arrived)."""
    obj = obj_or_update["object"] if isinstance(obj_or_update, dict) else obj_or_update
    xp = array_module(device)
    if region is None:
        crop = obj
    else:
        y0, y1, x0, x1 = region
        crop = obj[..., y0:y1, x0:x1]
    if get_array_module(crop) is xp:
        return crop.copy()
    return xp.asarray(to_numpy(crop))


def part_step(views, data, probe, crop, mixing, ctx: DMContext, part):
    """One DM view update on a part: Fourier error of the current model, the view
    update (eq. 3, or RAAR: ``ctx.view_update``), and the part's sums of eq. 6 (object).

    Returns a dict: ``views`` (stays on the worker), ``partial`` (travels to the
    reduction: object sums on the part's region), ``error``.
    """
    xp = get_array_module(views)
    probe = xp.asarray(probe)
    if mixing is not None:  # the probe modes were re-orthogonalised: mix the views alike
        views = xp.einsum("mk,jml...->jkl...", xp.asarray(mixing).astype(views.dtype), views)
    mask = None if ctx.mask is None else xp.asarray(ctx.mask)
    if is_gpu(xp):
        return _part_step_device(views, data, probe, crop, mask, ctx, part)
    corners = ctx.corners[part]
    # chunks of positions within a working-set budget; the views are updated in
    # place (the part's largest array: the paper's ~3x-the-raw-data footprint needs
    # that). Safe here: the graph orders every reader of the old views first.
    per_view = views[0].nbytes * 10  # po, 2po - psi, far field, products: ~10 view-sized temporaries
    budget = working_set_budget(views.nbytes + data.nbytes, *ctx.working_set) * 2**20
    chunk = max(1, int(budget // per_view))
    sums = {"object_num": xp.zeros(crop.shape, dtype=xp.complex128), "object_den": xp.zeros(crop.shape[1:], dtype=xp.float64)}
    error = 0.0
    for start in range(0, views.shape[0], chunk):
        sl = slice(start, start + chunk)
        index = window_index(corners[sl], ctx.window, crop.shape[-2:], xp)
        error += dm.fourier_error(probe, crop, index, data[sl], mask)
        views[sl] = dm.update_views(views[sl], probe, crop, index, data[sl], mask, ctx.beta, ctx.view_update)
        dm.dm_object_sums(views[sl], probe, index, crop.shape, out=sums)
    partial = {k: to_numpy(v) for k, v in sums.items()}
    partial["region"] = ctx.regions[part]
    return {"views": views, "partial": partial, "error": error}


def _views_per_launch(views, xp, work_arrays=1):
    """Positions per launch of the device kernels: ``work_arrays`` work arrays of views of
    that many positions within the device's memory budget."""
    per_position = work_arrays * views[0].nbytes + 4 * views.shape[-1] * views.shape[-2]
    return max(1, int(cuda.memory_fraction() * cuda.free_device_bytes(xp) // per_position))


def _part_step_device(views, data, probe, crop, mask, ctx: DMContext, part):
    """:func:`part_step` on the GPU: each launch of positions makes ``P O`` and ``2 P O -
    psi`` in one work array, transforms it in place, and updates the views and adds the
    object sums in one kernel (:mod:`daskptycho.physics.cuda`); nothing leaves the device
    but the Fourier error, read once at the end. RAAR (``ctx.view_update == "raar"``)
    first moves the views to ``beta psi + (1 - beta) P O`` (a second work array holds
    ``P O``), so that the kernel's eq. 3 step gives :func:`~daskptycho.physics.dm.raar_update_views`."""
    xp = get_array_module(views)
    views = xp.ascontiguousarray(views)  # after the modes' mixing (einsum) it may be a strided view; the kernels write it flat
    probe = probe.astype(xp.complex64, copy=False)
    crop = crop.astype(xp.complex64, copy=False)
    data = data.astype(xp.float32, copy=False)
    corners = cuda.cached_corners(ctx.corners[part], ctx.window, crop.shape[-2:], xp)
    num = xp.zeros(crop.shape, dtype=xp.complex128)
    den = xp.zeros(crop.shape[1:], dtype=xp.float64)
    error = xp.zeros((), dtype=xp.float64)
    raar = ctx.view_update == "raar"
    chunk = min(_views_per_launch(views, xp, 2 if raar else 1), max(views.shape[0], 1))
    work = xp.empty((chunk,) + views.shape[1:], dtype=xp.complex64)
    po_work = xp.empty_like(work) if raar else None
    for start in range(0, views.shape[0], chunk):
        psi, c, meas = views[start:start + chunk], corners[start:start + chunk], data[start:start + chunk]
        w = work[:psi.shape[0]]
        # the Fourier error of the current model P O (what the CPU path reports)
        w = cuda.fft_unscaled(cuda.dm_views_in(psi, probe, crop, c, w, False), True)
        error += cuda.dm_fourier(w, meas, mask, True)
        # eq. 3: psi += beta (F^-1 F_c [2 P O - psi] - P O), and eq. 6's sums
        w = cuda.fft_unscaled(cuda.dm_views_in(psi, probe, crop, c, w, True), True)
        cuda.dm_fourier(w, meas, mask, False)
        w = cuda.fft_unscaled(w, False)
        if raar:  # psi + beta (w - P O) from beta psi + (1 - beta) P O is the RAAR update
            po = cuda.dm_views_in(psi, probe, crop, c, po_work[:psi.shape[0]], False)
            po *= np.float32(1 - ctx.beta)
            psi *= np.float32(ctx.beta)
            psi += po
        cuda.dm_views_out(psi, w, probe, crop, c, ctx.beta, num, den)
    partial = {"object_num": num, "object_den": den, "region": ctx.regions[part]}
    return {"views": views, "partial": partial, "error": float(error)}


def probe_partial(views, crop, ctx: DMContext, part):
    """The part's sums of eq. 5 (probe) with the new object crop (small: K x N x N),
    over chunks of positions (on the GPU: one kernel, the sums stay on the device)."""
    xp = get_array_module(views)
    if is_gpu(xp):
        corners = cuda.cached_corners(ctx.corners[part], ctx.window, crop.shape[-2:], xp)
        num = xp.zeros(views.shape[1:2] + views.shape[-2:], dtype=xp.complex128)
        den = xp.zeros(views.shape[-2:], dtype=xp.float64)
        cuda.dm_probe_sums(views, xp.asarray(crop).astype(xp.complex64, copy=False), corners, num, den)
        return {"probe_num": num, "probe_den": den}
    per_view = views[0].nbytes * 3
    budget = working_set_budget(views.nbytes, *ctx.working_set) * 2**20
    chunk = max(1, int(budget // per_view))
    total = None
    for start in range(0, views.shape[0], chunk):
        sl = slice(start, start + chunk)
        index = window_index(ctx.corners[part][sl], ctx.window, crop.shape[-2:], xp)
        s = dm.dm_probe_sums(views[sl], crop, index)
        total = s if total is None else {k: total[k] + v for k, v in s.items()}
    return {k: to_numpy(v) for k, v in total.items()}


def add_partials(a, b):
    """Sum two object partials (eq. 6) on the union of their regions (the smallest box
    holding both), never on the whole grid: ``(0 + a) + b`` pixel by pixel, so the sum
    is the one a whole-grid sum in the same order gives, bit for bit.

    A partial is a dict: ``object_num`` (L, h, w), ``object_den`` (h, w) and ``region``
    ``(y0, y1, x0, x1)``, where they lie in the object.
    """
    ra, rb = a["region"], b["region"]
    region = (min(ra[0], rb[0]), max(ra[1], rb[1]), min(ra[2], rb[2]), max(ra[3], rb[3]))
    out = {"region": region}
    for name in ("object_num", "object_den"):
        xp = get_array_module(a[name])
        pa, pb = a[name], _in(b[name], xp)
        total = xp.zeros(pa.shape[:-2] + (region[1] - region[0], region[3] - region[2]), dtype=xp.result_type(pa, pb))
        for p, (y0, y1, x0, x1) in ((pa, ra), (pb, rb)):
            total[..., y0 - region[0]:y1 - region[0], x0 - region[2]:x1 - region[2]] += p
        out[name] = total
    return out


def add_probe_partials(a, b):
    """Sum two parts' probe partials (eq. 5): ``probe_num`` (K, N, N), ``probe_den`` (N, N)."""
    return {k: a[k] + b[k] for k in a}


def object_update(total, obj, ctx: DMContext):
    """Eq. 6 from the summed partials on their region (pixels outside it, and unlit ones,
    keep their value) and eq. 7 over the whole object.

    ``regularization`` (of :class:`DMContext`) is the floor added to the denominator, as a
    fraction of its peak; pixels under 1e-6 of the peak count as unlit.

    Returns a dict: ``object`` (L, H, W) and ``object_change`` (a float).
    """
    num, den = total["object_num"], total["object_den"]
    xp = get_array_module(num)
    obj = _in(obj, xp)
    y0, y1, x0, x1 = total["region"]
    peak = den.max()  # the region holds every lit pixel: the peak of the whole grid
    lit = den > 1e-6 * peak
    old = obj[..., y0:y1, x0:x1]
    new = obj.copy()
    new[..., y0:y1, x0:x1] = xp.where(lit, num / (den + ctx.regularization * peak), old).astype(obj.dtype)
    return {"object": new, "object_change": float(dm.relative_change(new, obj))}


def summary(oupd, pupd):
    """The small figures of an iteration's updates (not their arrays): ``object_change``,
    ``probe_change`` (K,) and ``fractions`` (K,), on the host."""
    return {"probe_change": np.asarray(to_numpy(pupd["probe_change"])), "object_change": float(oupd["object_change"]),
            "fractions": np.asarray(to_numpy(pupd["fractions"]))}


def _in(a, xp):
    """``a`` in ``xp``'s memory (a copy only when it lies elsewhere)."""
    return a if get_array_module(a) is xp else xp.asarray(to_numpy(a))


def probe_kept(probe):
    """The probe unchanged (iterations before probe refinement starts)."""
    fractions = to_numpy(orthogonalize_modes_with_mixing(probe)[1]) if probe.shape[0] > 1 else np.ones(1)
    return {"probe": probe, "mixing": None, "probe_change": np.zeros(probe.shape[0]), "fractions": fractions}


def probe_update(total, probe, ctx: DMContext):
    """Eq. 5 from the summed partials, eq. 7 per mode, then orthogonal modes.

    Returns a dict: ``probe``, ``mixing`` (K, K, for the views; None for one mode),
    ``probe_change`` (K,), ``fractions`` (K,).
    """
    den = total["probe_den"]
    xp = get_array_module(den)
    probe = _in(probe, xp)
    new = (total["probe_num"] / (den + ctx.regularization * den.max())).astype(probe.dtype)
    change = to_numpy(dm.relative_change(new, probe, axis=(-2, -1)))  # K numbers: the iteration's report
    mixing, fractions = None, np.ones(1)
    if new.shape[0] > 1:
        new, fractions, mixing = orthogonalize_modes_with_mixing(new)
        fractions = to_numpy(fractions)
    return {"probe": new, "mixing": mixing, "probe_change": change, "fractions": fractions}
