"""Engine ``hve``: the Halo Voxel Exchange baseline (section II-C of the paper).

Full batch (``batch_size=None``), one step per exchange, it is exact: each tile holds
every position whose window reaches its core, so its core update is the full-batch
one, and halos are overwritten by their owners' cores. With ``batch_size`` each tile
runs sequential minibatch updates on its own between exchanges (the independent
tile reconstruction of the paper): halos go stale and seams appear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import OptionsError
from ..schedule.hve import hve_iteration
from .gd import TiledRun, tiling_for
from .options import TiledOptions
from .problem import Problem


@dataclass(kw_only=True)
class HVEOptions(TiledOptions):
    """Options of engine ``hve`` (the Halo Voxel Exchange baseline): the tiled options;
    with ``batch_size`` each tile runs sequential minibatch updates on its own between
    exchanges."""

    ENGINE = "hve"
    engine: str = "hve"

    def check(self):
        super().check()
        if self.refine_probe:
            raise OptionsError("refine_probe", "the hve baseline duplicates positions across tiles and does not refine the probe; "
                               "use engine='gd'")


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


class HVERun(TiledRun):
    """Engine ``hve``: each tile steps on its own extended region, then pastes its core
    into its neighbours' halos (:func:`~daskptycho.schedule.hve.hve_iteration`)."""

    def __init__(self, drv, problem, source, progress=None):
        tiling = tiling_for(problem)
        specs = hve_tiles(problem, tiling)
        self.extended = {k: ext for k, (_, ext) in specs.items()}
        super().__init__(drv, problem, source, progress, tiling, specs)

    def build(self, it, refine):
        return hve_iteration(self.tiling, self.extended, it, self.states, self.data, self.probe, self.ctx,
                             self.problem.n_positions, tag=self.tag)


def run(drv, ds, problem, source, progress=None):
    """Run engine ``hve`` on the driver's cluster (the registry's signature)."""
    return problem, HVERun(drv, problem, source, progress).run()
