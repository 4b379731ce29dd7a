"""Engine ``hve``: the Halo Voxel Exchange baseline (section II-C of the paper).

Full batch (``batch_size=None``), one step per exchange, it is exact: each tile holds
every position whose window reaches its core, so its core update is the full-batch
one, and halos are overwritten by their owners' cores. With ``batch_size`` each tile
runs sequential minibatch updates on its own between exchanges (the independent
tile reconstruction of the paper): halos go stale and seams appear.
"""

from __future__ import annotations

import numpy as np

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
    tiling = tiling_for(problem)
    specs = hve_tiles(problem, tiling)
    extended = {k: ext for k, (_, ext) in specs.items()}
    n_total = problem.n_positions

    def build(it, states, data, probe, ctx, refine):
        return hve_iteration(tiling, extended, it, states, data, probe, ctx, n_total)

    obj, probe, costs, mem, recoveries = run_tiles(drv, problem, source, tiling, specs, build, progress)
    return obj, probe, costs, {"tiling": tiling, "memory": mem, "recoveries": recoveries}
