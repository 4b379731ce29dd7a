"""The functions that run as tasks on the worker owning a tile.

Pure functions of their inputs (no in-place changes to an input: a task may be
re-run after a lost worker), on NumPy or CuPy arrays.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..backend import array_module, get_array_module, to_numpy
from ..io.patterns import load_patterns_from_store
from ..physics.dispatch import kernels
from ..physics.positions import refine_positions, search_positions, window_corners_of
from .ml import POSITION_STEP
from .updates import (
    clip_amplitude,
    gradient_sum,
    minibatches,
    object_step,
    object_step_consuming,
    positions_per_chunk,
    probe_step,
    working_set_budget,
)


@dataclass
class TileContext:
    """What every tile task needs besides its own arrays (small, broadcast once).

    Attributes
    ----------
    corners : dict ``{(r, c): int array (J_t, 2)}``: window corners of each tile's
        positions, relative to the tile's extended region.
    eps_per_position : float
        Preconditioner floor per position in a gradient sum (the reference
        engine's ``Problem.eps_object(1)``), so tiles apply its exact arithmetic.
    counted : dict ``{(r, c): bool array (J_t,)}`` or None
        Which of a tile's positions it owns, where tiles share positions (hve): only
        those count in its cost. None: every tile owns all its positions.
    origins : dict ``{(r, c): (y0, x0)}`` or None
        Each tile's extended region's first pixel on the object grid (position
        correction: the tile's positions are in grid pixel coordinates).
    position_start : dict ``{(r, c): float64 array (J_t, 2)}`` or None
        With position correction: the store's probe centres of each tile's positions,
        grid pixel coordinates (the reference of ``position_max_shift_px``); None: the
        positions are not refined.
    position_max_shift_px : float
        Most a position may move from its ``position_start``, per axis, pixels.
    """

    kernel: np.ndarray
    mask: np.ndarray | None
    window: tuple
    corners: dict
    cost: str
    working_set: tuple  # (cap in MiB, fraction of the tile's state)
    step: float
    probe_step: float
    regularization: float
    eps_per_position: float
    device: str = "cpu"
    local_batch: int | str | None = None  # positions per local minibatch ("auto": tasks.updates.minibatches; None: all of the tile's)
    hve_minibatch: bool = False
    amplitude_max: float | None = None  # clip the object's amplitude after each step (EngineOptions.amplitude_max)
    counted: dict | None = None
    pads: dict | None = None  # {(r, c): (top, bottom, left, right)}: how far the tile's windows reach past it
    origins: dict | None = None
    position_start: dict | None = None
    position_max_shift_px: float = 0.0

    def xp(self):
        return array_module(self.device)


def load_tile_patterns(source, scan_indices, device="cpu"):
    """Read a tile's own patterns (J_t, N, N) from the store, in FFT order.

    ``source`` is a store path (read on this worker) or an in-memory array of all
    patterns (FFT order) for datasets that were never written to a store.
    """
    if isinstance(source, str):
        data = load_patterns_from_store(source, scan_indices)
    else:
        data = np.asarray(source)[np.asarray(scan_indices)]
    return array_module(device).asarray(data)


def initial_patch(slices, region, device="cpu", start=None):
    """The tile's extended region of the starting object (S, h, w): ones, the
    :meth:`~daskptycho.engines.problem.Problem.initial_object`, made on the worker from
    the shape alone (the whole object never travels), or ``start``, the region of a
    given starting object (host array (S, h, w))."""
    if start is not None:
        return array_module(device).asarray(np.asarray(start, dtype=np.complex64)).copy()
    y0, y1, x0, x1 = region
    return array_module(device).ones((int(slices), y1 - y0, x1 - x0), dtype=np.complex64)


def window_pads(corners_rel, window, shape):
    """How far windows (corners relative to an extended region of ``shape``) reach past it:
    ``(top, bottom, left, right)`` pixels, or None when they all lie inside."""
    if len(corners_rel) == 0:
        return None
    ny, nx = window
    h, w = shape
    top, left = (max(0, int(-corners_rel[:, a].min())) for a in (0, 1))
    bottom = max(0, int((corners_rel[:, 0] + ny).max()) - h)
    right = max(0, int((corners_rel[:, 1] + nx).max()) - w)
    return (top, bottom, left, right) if top or bottom or left or right else None


def tile_corners(positions, ctx: TileContext, tile, shape):
    """The window corners of a tile's refined ``positions`` (float64 (J_t, 2), grid pixel
    coordinates) relative to its extended region of ``shape`` (h, w), and how far they
    reach past it (:func:`window_pads`; the corners are then relative to the region padded
    by that much), as :func:`~daskptycho.engines.gd.context_for` makes them for the
    store's positions."""
    rel = window_corners_of(positions, ctx.window) - np.asarray(ctx.origins[tile], dtype=np.int64)
    pad = window_pads(rel, ctx.window, shape)
    if pad is not None:
        rel = rel + np.array([pad[0], pad[2]])
    return rel, pad


def tile_gradient(state, data, local, probe, ctx: TileContext, tile, refine_probe, local_updates, positions=None):
    """Gradient buffer of one tile's positions ``local`` (indices into its patterns).

    ``positions``: with position correction, the tile's refined probe centres (float64
    (J_t, 2), grid pixel coordinates; :func:`tile_positions`): the windows are cut at
    their rounded values instead of ``ctx.corners``.

    Returns a dict with ``object`` and ``illumination`` (the buffer, (S, h, w)),
    ``cost``, and with ``refine_probe`` the probe gradient parts; with
    ``local_updates`` also ``local_object``, the tile after per-minibatch steps.
    """
    xp = get_array_module(state)
    kernel = xp.asarray(ctx.kernel)
    mask = None if ctx.mask is None else xp.asarray(ctx.mask)
    probe = xp.asarray(probe)
    if positions is None:
        corners = ctx.corners[tile]
        pad = None if ctx.pads is None else ctx.pads.get(tile)
    else:
        corners, pad = tile_corners(positions, ctx, tile, state.shape[-2:])
    local = np.asarray(local, dtype=np.int64)
    budget = working_set_budget(state.nbytes + data.nbytes, *ctx.working_set)
    chunk = positions_per_chunk(ctx.window, state.shape[0], probe.shape[0], budget)

    counted = None if ctx.counted is None else ctx.counted[tile]

    def gsum(obj, sel):
        if pad is None:
            return gradient_sum(obj, probe, corners, ctx.window, kernel, data, sel, mask, ctx.cost, chunk, refine_probe, counted,
                                budget_mib=budget)
        # windows reach past the tile (probe-support halos): the object there is held
        # fixed at the tile's edge values (the nearest it has), and the gradient there is dropped
        top, bottom, left, right = pad
        s, h, w = obj.shape
        big = _pad_edge(xp, obj, top, bottom, left, right)
        g = gradient_sum(big, probe, corners, ctx.window, kernel, data, sel, mask, ctx.cost, chunk, refine_probe, counted,
                         budget_mib=budget)
        for k in ("object", "illumination"):
            g[k] = g[k][:, top:top + h, left:left + w].copy()
        return g

    if not local_updates:
        return gsum(state, local)
    # Alg. 1, lines 5-9: accumulate each minibatch's gradient into the buffer and
    # step the tile with it at once
    obj = state
    total = None
    # interleaved minibatches: each spreads over the whole tile (the positions come in
    # scan order, so contiguous ones would step the tile a stripe at a time)
    n_batches = minibatches(local.size, ctx.local_batch)
    for sel in (local[k::n_batches] for k in range(n_batches)):
        gb = gsum(obj, sel)
        obj = object_step(obj, gb["object"], gb["illumination"], ctx.step, ctx.eps_per_position * sel.size, ctx.amplitude_max)
        total = gb if total is None else {k: total[k] + v for k, v in gb.items()}
    if total is None:
        total = gsum(state, local)
    total["local_object"] = obj
    return total


def _pad_edge(xp, a, top, bottom, left, right):
    """``xp.pad(a, ((0, 0), (top, bottom), (left, right)), mode="edge")`` for a (S, h, w)
    array, by four slice copies: 7x faster than NumPy's general ``pad`` on a tile (0.02 ms
    against 0.12 ms at 200^2 px), which a tile's gradient pays every round."""
    s, h, w = a.shape
    out = xp.empty((s, top + h + bottom, left + w + right), dtype=a.dtype)
    out[:, top:top + h, left:left + w] = a
    out[:, top:top + h, :left] = a[:, :, :1]
    out[:, top:top + h, left + w:] = a[:, :, w - 1:]
    out[:, :top] = out[:, top:top + 1]
    out[:, top + h:] = out[:, top + h - 1:top + h]
    return out


def round_group(n_positions, rounds, rnd, tile, seed, iteration):
    """Round ``rnd``'s share of a tile's ``n_positions`` positions in iteration
    ``iteration``: every ``rounds``-th of a random order drawn from ``(seed, iteration,
    tile)``, sorted (int64 indices into the tile's patterns). The rounds of one iteration
    partition the positions; each spreads over the tile."""
    order = _round_order(int(n_positions), int(seed), int(iteration), int(tile[0]), int(tile[1]))
    return np.sort(order[rnd::rounds])


@functools.lru_cache(maxsize=64)
def _round_order(n_positions, seed, iteration, row, col):
    """The random order of an iteration's positions on one tile, drawn once for all its
    rounds (read only)."""
    order = np.random.default_rng([seed, iteration, row, col]).permutation(n_positions)
    order.flags.writeable = False
    return order


def start_positions(ctx: TileContext, tile):
    """A tile's starting probe-centre estimates: the store's (float64 (J_t, 2), grid pixel
    coordinates), made on the tile's worker from the context."""
    return np.array(ctx.position_start[tile], dtype=np.float64)


def kept_positions(positions):
    """The tile's positions unchanged (an iteration that does not refine them: the block's
    positions then come out of the same stage as its states)."""
    return positions


def tile_positions(state, data, positions, probe, ctx: TileContext, tile, search):
    """One refinement of a tile's own positions on its own extended patch (its state).

    The same arithmetic as engine ml's (:func:`~daskptycho.tasks.ml.refine_ml_positions`):
    with ``search`` (the first refinement) every whole-pixel window within
    ``position_max_shift_px`` first (:func:`~daskptycho.physics.positions.search_positions`),
    then the parabolic step (:func:`~daskptycho.physics.positions.refine_positions`). The
    windows are cut from the patch padded with its edge values where they reach past it,
    the object :func:`tile_gradient` uses there, so every position the tile owns is
    refined, and keeps its tile wherever it moves.

    Parameters
    ----------
    state : complex array (S, h, w), the tile's extended patch
    data : real array (J_t, N, N), the tile's patterns (FFT order)
    positions : float64 array (J_t, 2), the current estimates (grid pixel coordinates)
    probe : complex array (K, N, N)
    search : bool, search the whole-pixel windows first

    Returns
    -------
    float64 array (J_t, 2), the refined estimates (grid pixel coordinates, host memory)
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape[0] == 0:
        return positions.copy()
    xp = get_array_module(state)
    origin = np.asarray(ctx.origins[tile], dtype=np.float64)
    est = positions - origin
    start = np.asarray(ctx.position_start[tile], dtype=np.float64) - origin
    max_shift = float(ctx.position_max_shift_px)
    radius = int(np.ceil(max_shift))
    reach = radius if search else 1
    rel = window_corners_of(est, ctx.window)
    s, h, w = state.shape
    ny, nx = ctx.window
    top, left = (max(0, reach - int(rel[:, a].min())) for a in (0, 1))
    bottom = max(0, int(rel[:, 0].max()) + reach + ny - h)
    right = max(0, int(rel[:, 1].max()) + reach + nx - w)
    obj = state
    if top or bottom or left or right:  # as tile_gradient: the object beyond the patch is its edge
        obj = xp.pad(state, ((0, 0), (top, bottom), (left, right)), mode="edge")
    shift = np.array([top, left], dtype=np.float64)
    est, start = est + shift, start + shift
    kernel = xp.asarray(ctx.kernel)
    mask = None if ctx.mask is None else xp.asarray(ctx.mask)
    probe = xp.asarray(probe)
    budget = working_set_budget(state.nbytes + data.nbytes, *ctx.working_set)
    chunk = positions_per_chunk(ctx.window, s, probe.shape[0], budget)
    if search:
        est = search_positions(obj, probe, kernel, data, est, start, radius, mask, ctx.cost, max_shift, chunk=chunk)
    est = refine_positions(obj, probe, kernel, data, est, start, mask, ctx.cost, max_shift, step=POSITION_STEP, chunk=chunk)
    return est - shift + origin


def _overlap(a, b):
    """Intersection of two local regions ``(slice y, slice x)`` (steps of 1), or None."""
    y0, y1 = max(a[0].start, b[0].start), min(a[0].stop, b[0].stop)
    x0, x1 = max(a[1].start, b[1].start), min(a[1].stop, b[1].stop)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


def regions_overlap(a, b):
    """Do two local regions ``(slice y, slice x)`` share a pixel?"""
    return _overlap(a, b) is not None


def _shift(region, origin):
    """``region`` in the coordinates of an array whose first pixel is ``origin``'s."""
    return slice(region[0].start - origin[0].start, region[0].stop - origin[0].start), \
        slice(region[1].start - origin[1].start, region[1].stop - origin[1].start)


def apply_patches(buf, strips, patches, region=None):
    """A tile's buffer with the strips it received applied, in order: a new dict of copies.

    Parameters
    ----------
    buf : dict with ``object`` (S, h, w) complex and ``illumination`` (S, h, w) real: the
        buffer its gradient task made (never changed)
    strips : list of dicts like ``buf``, each covering exactly its patch's region
    patches : sequence of ``(op, (slice y, slice x))``: ``"add"`` (forward pass) or
        ``"replace"`` (backward pass), and where the strip goes in the tile
    region : (slice y, slice x), optional
        Build only this part (a strip to send on); default the whole buffer.

    Every pixel gets exactly the operations, in the same order, that adding and
    pasting the strips into the whole buffer one pass after another would give it,
    so the result is bit for bit that of materialising each pass.
    """
    h, w = buf["object"].shape[-2:]
    region = region or (slice(0, h), slice(0, w))
    out = {k: buf[k][..., region[0], region[1]].copy() for k in ("object", "illumination")}
    for strip, (op, where) in zip(strips, patches):
        both = _overlap(where, region)
        if both is None:
            continue
        dst, src = _shift(both, region), _shift(both, where)
        for k in ("object", "illumination"):
            if op == "add":
                out[k][..., dst[0], dst[1]] += strip[k][..., src[0], src[1]]
            elif op == "replace":
                out[k][..., dst[0], dst[1]] = strip[k][..., src[0], src[1]]
            else:
                raise ValueError(f"unknown patch operation {op!r}")
    return out


def cut_strip(buf, strips, patches, region):
    """The overlap strip (copies) a tile sends a neighbour: ``region`` of its buffer with
    the strips received so far applied (:func:`apply_patches`), on the sending worker.

    Only the strip is built: the tile's whole buffer is never copied for a pass.
    """
    return apply_patches(buf, strips, patches, region)


def probe_part(grad):
    """The probe-gradient parts of a tile's gradient (small: K x N x N)."""
    return {"probe": grad["probe"], "probe_illumination": grad["probe_illumination"]}


def add_parts(a, b):
    return {k: a[k] + b[k] for k in a}


def probe_update(probe, total, ctx: TileContext):
    """The new probe from the probe gradient summed over every tile."""
    xp = get_array_module(total["probe"])
    return probe_step(xp.asarray(probe), total["probe"], total["probe_illumination"], ctx.probe_step, ctx.regularization)


def relay(value):
    """``value`` as received: a worker's copy of the stepped probe, which its own tiles read
    and which it passes on to the workers below it in the probe's broadcast tree."""
    return value


def tile_update(state, local_object, buf, strips, patches, ctx: TileContext, n_positions):
    """Step the tile with its accumulated buffer (Alg. 1, lines 15-17); with local
    updates, from the locally stepped tile ``local_object``.

    The accumulated buffer is the gradient task's ``buf`` with the strips of every pass
    applied in order (:func:`apply_patches`); with none (one tile) ``buf`` is used as is.
    """
    base = state if local_object is None else local_object
    eps = ctx.eps_per_position * n_positions
    if not patches:
        return object_step(base, buf["object"], buf["illumination"], ctx.step, eps, ctx.amplitude_max)
    # one slice at a time: the accumulated buffer of a slice is this task's own copy, the
    # step works in it, and no second buffer of the whole tile exists beside the gradient's
    xp = get_array_module(base)
    out = xp.empty_like(base)
    S = base.shape[0]
    if _step_in_one_pass(xp, base, buf, strips, patches, out, ctx.step / S / 2, eps):
        if ctx.amplitude_max is not None:
            clip_amplitude(out, ctx.amplitude_max)
        return out
    for k in range(S):
        one = apply_patches(_slice(buf, k), [_slice(st, k) for st in strips], patches)
        out[k:k + 1] = object_step_consuming(base[k:k + 1], one["object"], one["illumination"], ctx.step, eps, slices=S,
                                             amplitude_max=ctx.amplitude_max)
    return out


def _step_in_one_pass(xp, base, buf, strips, patches, out, half_step, eps):
    """:func:`tile_update`'s step by the compiled kernel
    (:func:`daskptycho.physics._compiled.step_tile`: the strips applied and the step taken
    in one pass over each slice, no copy of the buffer), into ``out``; False (nothing
    done) where it does not apply: no Numba, device or other-precision arrays. On a
    142 x 142 tile with two strips: 36 us per call against 62 us in NumPy's passes."""
    compiled = kernels()
    if compiled is None or xp is not np or base.dtype != np.complex64 or buf["object"].dtype != np.complex64 \
            or buf["illumination"].dtype != np.float32:
        return False
    h, w = base.shape[-2:]
    tile = (slice(0, h), slice(0, w))
    boxes, adds, keep = [], [], []
    for i, (op, where) in enumerate(patches):
        if op not in ("add", "replace"):
            raise ValueError(f"unknown patch operation {op!r}")
        both = _overlap(where, tile)
        if both is None:
            continue
        src = _shift(both, where)
        boxes.append((both[0].start, both[0].stop, both[1].start, both[1].stop, src[0].start, src[1].start))
        adds.append(op == "add")
        keep.append(i)
    if not keep or any(strips[i][k].dtype != buf[k].dtype for i in keep for k in ("object", "illumination")):
        return False
    boxes = np.asarray(boxes, dtype=np.int64)
    adds = np.asarray(adds, dtype=np.bool_)

    def floats(a):  # complex64 (h, w) as (h, 2 w) float32
        return np.ascontiguousarray(a).view(np.float32)

    for k in range(base.shape[0]):
        s_obj = tuple(floats(strips[i]["object"][k]) for i in keep)
        s_il = tuple(np.ascontiguousarray(strips[i]["illumination"][k]) for i in keep)
        compiled.step_tile(floats(base[k]), floats(buf["object"][k]), np.ascontiguousarray(buf["illumination"][k]), s_obj,
                           s_il, boxes, adds, np.float32(half_step), np.float32(eps), out[k].view(np.float32))
    return True


def _slice(buf, k):
    """Slice ``k`` (a view, leading axis kept) of a buffer or strip dict."""
    return {"object": buf["object"][k:k + 1], "illumination": buf["illumination"][k:k + 1]}


def core_of(state, region):
    """The tile's core, in host memory (a copy): the only part that goes back for stitching."""
    sy, sx = region
    return to_numpy(state[..., sy, sx])


def hve_local_step(state, data, probe, ctx: TileContext, tile, n_total):
    """One independent iteration of a Halo Voxel Exchange tile on its extended region."""
    local = np.arange(data.shape[0])
    if ctx.hve_minibatch:
        # independent sequential (minibatch) updates of the extended tile, as the
        # baseline's own tile reconstruction does
        g = tile_gradient(state, data, local, probe, ctx, tile, False, True)
        return {"object": g["local_object"], "cost": g["cost"]}
    g = tile_gradient(state, data, local, probe, ctx, tile, False, False)
    return {"object": object_step(state, g["object"], g["illumination"], ctx.step, ctx.eps_per_position * n_total, ctx.amplitude_max),
            "cost": g["cost"]}


def hve_cut(stepped, region):
    """The part of a tile's core another tile needs (a copy, on the sending worker)."""
    sy, sx = region
    return stepped["object"][..., sy, sx].copy()


def hve_paste(stepped, pieces, regions):
    """Paste neighbours' core voxels into this tile's halo."""
    out = stepped["object"].copy()
    for piece, (sy, sx) in zip(pieces, regions):
        out[..., sy, sx] = piece
    return out
