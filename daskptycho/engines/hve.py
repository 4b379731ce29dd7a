"""Engine ``hve``: the Halo Voxel Exchange baseline (section II-C of the paper)."""

from __future__ import annotations

import numpy as np

from ..errors import OptionsError
from ..schedule.hve import hve_iteration
from .gd import run_tiles, tiling_for
from .problem import Problem


def hve_tiles(problem: Problem, tiling):
    """Each tile's positions (every window that reaches into its core) and its
    extended region (the bounding box of those windows and the core)."""
    ny, nx = problem.window
    cy, cx = problem.corners[:, 0], problem.corners[:, 1]
    specs = {}
    for t in tiling:
        y0, y1, x0, x1 = t.core
        pos = np.flatnonzero((cy < y1) & (cy + ny > y0) & (cx < x1) & (cx + nx > x0))
        if pos.size:
            ext = (min(y0, int(cy[pos].min())), max(y1, int(cy[pos].max()) + ny),
                   min(x0, int(cx[pos].min())), max(x1, int(cx[pos].max()) + nx))
        else:
            ext = t.core
        specs[t.key] = (pos, ext)
    return specs


def run_hve(drv, problem: Problem, source, progress=None):
    o = problem.options
    if o.refine_probe:
        raise OptionsError("refine_probe", "the hve baseline duplicates positions across tiles and does not refine the probe; use engine='gd'")
    if o.local_updates or o.batch_size:
        raise OptionsError("batch_size", "the hve baseline runs full-batch steps on each tile; leave batch_size and local_updates unset")
    tiling = tiling_for(problem)
    specs = hve_tiles(problem, tiling)
    extended = {k: ext for k, (_, ext) in specs.items()}
    n_total = problem.n_positions

    def build(it, states, data, probe, ctx, refine):
        return hve_iteration(tiling, extended, it, states, data, probe, ctx, n_total)

    obj, probe, costs, mem = run_tiles(drv, problem, source, tiling, specs, build, progress)
    return obj, probe, costs, {"tiling": tiling, "memory": mem}
