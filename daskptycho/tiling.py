"""A grid of R x C tiles over the object field.

Tile cores partition the object grid (with clipped windows: the part of it within one
halo of the positions' centres). Each probe position belongs to the tile whose
core holds its centre pixel. A tile's *extended region* is its core grown by one
halo width per axis (the same for every tile, clipped to the grid), wide enough to
hold the probe windows of the tile's positions. Because every tile uses the same
halo, the tiles whose extended regions cover a pixel form a contiguous block of rows
and columns: the forward/backward passes rely on this.

All regions are half-open pixel ranges ``(y0, y1, x0, x1)`` on the global grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import OptionsError
from .geometry import ObjectGrid


@dataclass(frozen=True)
class Tile:
    """One tile: its place in the grid, core, extended region and positions."""

    row: int
    col: int
    core: tuple          # (y0, y1, x0, x1)
    extended: tuple      # (y0, y1, x0, x1)
    positions: np.ndarray = field(repr=False)  # scan indices owned by this tile (sorted)

    @property
    def key(self):
        return (self.row, self.col)

    @property
    def shape(self):
        y0, y1, x0, x1 = self.extended
        return (y1 - y0, x1 - x0)

    def local(self, region):
        """Slices of ``region`` (global pixels) inside this tile's extended array."""
        y0, y1, x0, x1 = region
        ey, ex = self.extended[0], self.extended[2]
        return (slice(y0 - ey, y1 - ey), slice(x0 - ex, x1 - ex))


def intersect(a, b):
    """Intersection of two regions, or None when empty."""
    y0, y1 = max(a[0], b[0]), min(a[1], b[1])
    x0, x1 = max(a[2], b[2]), min(a[3], b[3])
    if y0 >= y1 or x0 >= x1:
        return None
    return (y0, y1, x0, x1)


@dataclass(frozen=True)
class Tiling:
    """R x C tiles over ``grid`` (see module docstring)."""

    grid: ObjectGrid
    rows: int
    cols: int
    halo: tuple                  # (hy, hx) pixels
    row_edges: tuple             # R + 1 core edges along y
    col_edges: tuple             # C + 1 core edges along x
    tiles: tuple                 # row-major

    def __getitem__(self, rc):
        r, c = rc
        return self.tiles[r * self.cols + c]

    def __iter__(self):
        return iter(self.tiles)

    def overlap(self, a, b):
        """Overlap of the extended regions of tiles ``a`` and ``b`` ((r, c) pairs), or None."""
        return intersect(self[a].extended, self[b].extended)

    def stitch_cores(self, cores, xp=np, fill=0):
        """Assemble the full object (..., H, W) from each tile's core array; pixels no core
        holds (the border beyond clipped outer cores) get ``fill``."""
        first = next(iter(cores.values()))
        out = xp.full(first.shape[:-2] + tuple(self.grid.shape), fill, dtype=first.dtype)
        for t in self.tiles:
            y0, y1, x0, x1 = t.core
            out[..., y0:y1, x0:x1] = cores[t.key]
        return out

    def crop(self, full, tile):
        """The extended region of ``tile`` from a full-grid array (..., H, W) (a copy)."""
        y0, y1, x0, x1 = tile.extended
        return full[..., y0:y1, x0:x1].copy()


def _edges(lo, hi, n, size):
    """n cores over [0, size): inner edges split the scanned range [lo, hi] evenly."""
    inner = np.rint(np.linspace(lo, hi + 1, n + 1)[1:-1]).astype(int)
    return (0, *(int(v) for v in inner), size)


def make_tiling(grid: ObjectGrid, corners, window, tiles, halo_px=None, clip_windows=False) -> Tiling:
    """Tile the object grid.

    Parameters
    ----------
    grid : ObjectGrid
    corners : int array (J, 2)
        Top-left pixel of each position's probe window (``grid.window_corners``).
    window : (int, int)
        Probe window (N_y, N_x).
    tiles : (int, int)
        (R, C).
    halo_px : (int, int), optional
        Halo width per axis. Default: the smallest that holds every window, i.e.
        ``N // 2`` on each side of a core (positions sit within the core).
    clip_windows : bool
        Allow halos narrower than the windows: the tiles' windows then reach past their
        extended regions, where the engine treats the object as fixed (probe-support
        halos, see :func:`daskptycho.engines.gd.halo_for`). The outer cores then end one
        halo beyond the outermost centres, with no halo outside them: the grid's border
        beyond (which no window reaches, or only where the engine holds it fixed) belongs
        to no tile and keeps the starting object.

    Raises
    ------
    OptionsError
        If there are more tiles than scan rows/columns of pixels, or ``halo_px`` is
        too narrow to hold the windows.
    """
    corners = np.asarray(corners)
    window = tuple(int(v) for v in window)
    r, c = (int(v) for v in tiles)
    centre = corners + np.asarray(window) // 2
    lo, hi = centre.min(axis=0), centre.max(axis=0)
    span = hi - lo + 1
    if r > span[0] or c > span[1]:
        raise OptionsError("tiles", f"{r}x{c} tiles but the scan covers only {span[0]}x{span[1]} pixels of positions; use fewer tiles")
    row_edges = _edges(lo[0], hi[0], r, grid.shape[0])
    col_edges = _edges(lo[1], hi[1], c, grid.shape[1])
    need = (max(window[0] // 2, window[0] - window[0] // 2 - 1), max(window[1] // 2, window[1] - window[1] // 2 - 1))
    if halo_px is None:
        halo = need
    else:
        halo = tuple(int(v) for v in halo_px)
        if min(halo) < 0:
            raise OptionsError("halo_m", f"got a halo of {halo} px; expected >= 0")
        if not clip_windows and (halo[0] < need[0] or halo[1] < need[1]):
            raise OptionsError("halo_m", f"a halo of {halo} px cannot hold the {window[0]}x{window[1]} probe windows; it needs at least {need} px")
    if (centre < 0).any() or (centre >= np.asarray(grid.shape)).any():
        raise OptionsError("positions", "a probe window centre lies outside the object grid; build the grid from the positions (object_grid)")
    if clip_windows:
        # nothing beyond a halo of the outermost centres is updated (windows reaching past a
        # tile's extended region are held fixed there): the outer cores end there, and the
        # border of the grid beyond them is held by no tile
        row_edges = (max(0, int(lo[0]) - halo[0]), *row_edges[1:-1], min(grid.shape[0], int(hi[0]) + 1 + halo[0]))
        col_edges = (max(0, int(lo[1]) - halo[1]), *col_edges[1:-1], min(grid.shape[1], int(hi[1]) + 1 + halo[1]))
    # with clipped outer cores, an outer tile's extended region does not grow past its core
    grow = (lambda first, last: (0 if first else 1, 0 if last else 1)) if clip_windows else (lambda first, last: (1, 1))
    tr = np.searchsorted(row_edges, centre[:, 0], side="right") - 1
    tc = np.searchsorted(col_edges, centre[:, 1], side="right") - 1
    out = []
    for i in range(r):
        for j in range(c):
            core = (row_edges[i], row_edges[i + 1], col_edges[j], col_edges[j + 1])
            (gt, gb), (gl, gr) = grow(i == 0, i == r - 1), grow(j == 0, j == c - 1)
            ext = (max(0, core[0] - gt * halo[0]), min(grid.shape[0], core[1] + gb * halo[0]),
                   max(0, core[2] - gl * halo[1]), min(grid.shape[1], core[3] + gr * halo[1]))
            own = np.flatnonzero((tr == i) & (tc == j))
            out.append(Tile(i, j, core, ext, own))
    return Tiling(grid, r, c, halo, row_edges, col_edges, tuple(out))


def halo_from_metres(halo_m, pixel_size_m):
    """Halo width in pixels (per axis) for a halo given in metres."""
    if halo_m is None:
        return None
    px = int(math.ceil(halo_m / pixel_size_m))
    return (px, px)
