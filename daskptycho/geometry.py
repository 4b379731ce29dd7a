"""The object grid and where each probe window falls on it.

Convention (``docs/format.md``): object pixel ``(i, j)`` has its **centre** at
``(y0 + i * dx, x0 + j * dx)`` metres; the probe window is ``N`` pixels wide with the
probe centre on window pixel ``N // 2``. A position ``p`` (metres) therefore puts
window pixel ``N // 2`` on the object pixel nearest to ``p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ObjectGrid:
    """A regular grid of object pixels.

    Attributes
    ----------
    origin_m : (float, float)
        (y, x) of the centre of pixel (0, 0), metres.
    shape : (int, int)
        (H, W) pixels.
    pixel_size_m : float
    """

    origin_m: tuple
    shape: tuple
    pixel_size_m: float

    @property
    def y(self):
        return self.origin_m[0] + self.pixel_size_m * np.arange(self.shape[0])

    @property
    def x(self):
        return self.origin_m[1] + self.pixel_size_m * np.arange(self.shape[1])

    def pixel_coordinates(self, positions_m):
        """Fractional pixel coordinates (J, 2) of positions (J, 2) in metres."""
        return (np.asarray(positions_m) - np.asarray(self.origin_m)) / self.pixel_size_m

    def window_corners(self, positions_m, window):
        """Top-left pixel (J, 2) int of each probe window."""
        centre = np.rint(self.pixel_coordinates(positions_m)).astype(np.int64)
        return centre - np.asarray(window) // 2


def object_grid(positions_m, window, pixel_size_m, pad_px=0) -> ObjectGrid:
    """The smallest grid that holds every probe window, plus ``pad_px`` on each side.

    The origin is the first position minus a whole number of pixels, so positions
    on a pixel lattice fall exactly on pixel centres.

    Parameters
    ----------
    positions_m : array (J, 2)
        Probe centres (y, x) in metres.
    window : (int, int)
        Probe window (N_y, N_x) in pixels.
    pixel_size_m : float
    pad_px : int
    """
    pos = np.asarray(positions_m, dtype=np.float64)
    window = np.asarray(window)
    lo = pos.min(axis=0)
    span = np.rint((pos.max(axis=0) - lo) / pixel_size_m).astype(int)
    origin = lo - (window // 2 + pad_px) * pixel_size_m
    shape = span + window + 2 * pad_px
    return ObjectGrid(tuple(float(v) for v in origin), tuple(int(v) for v in shape), float(pixel_size_m))


def grid_from_coords(y, x) -> ObjectGrid:
    """The :class:`ObjectGrid` of an object with metre coordinates ``y``, ``x``."""
    y = np.asarray(y)
    x = np.asarray(x)
    dx = float(y[1] - y[0]) if y.size > 1 else float(x[1] - x[0])
    return ObjectGrid((float(y[0]), float(x[0])), (y.size, x.size), dx)
