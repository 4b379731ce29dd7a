"""Engine ``hve``: the Halo Voxel Exchange baseline (section II-C of the paper).

Each tile holds its core's positions and those around it, steps its extended region on
its own, then its core is pasted into its neighbours' halos. With ``halo="probe"`` (the
default) a tile holds, as in the paper, two extra rows of positions around its core, on
the bounding box of their probes' supports; with ``halo="window"`` it holds every position
whose window reaches its core, and then, in full batch (``batch_size=None``, one step per
exchange), hve is exact: each core update is the full-batch one. With ``batch_size`` each
tile runs sequential minibatch updates on its own between exchanges (the independent tile
reconstruction of the paper): halos go stale and seams appear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import OptionsError
from ..schedule.hve import hve_iteration
from .gd import TiledRun, halo_for, tiling_for
from .options import TiledOptions, boolean, option
from .problem import Problem, fast_axis_step


@dataclass(kw_only=True)
class HVEOptions(TiledOptions):
    """Options of engine ``hve`` (the Halo Voxel Exchange baseline): the tiled options;
    with ``batch_size`` each tile runs sequential minibatch updates on its own between
    exchanges."""

    ENGINE = "hve"
    engine: str = "hve"
    refine_probe: bool = option(boolean, False)  # the baseline keeps the probe (config's default is ml's and gd's)

    def check(self):
        super().check()
        if self.refine_probe:
            raise OptionsError("refine_probe", "the hve baseline duplicates positions across tiles and does not refine the probe; "
                               "use engine='gd'")


def hve_tiles(problem: Problem, tiling, halo=None):
    """Each tile's positions and its extended region.

    ``halo`` None (``halo="window"``): every position whose window reaches into the core,
    on the bounding box of those windows and the core (exact in full batch). Otherwise
    (``halo="probe"``, the paper's baseline): the core's own positions and two extra rows
    of positions around it (centres within two scan steps of the core), on the bounding
    box of their probes' supports (``halo`` px about each centre) and the core; their
    windows beyond it are held fixed, as gd's are.
    """
    ny, nx = problem.window
    cy, cx = problem.corners[:, 0], problem.corners[:, 1]
    if halo is not None:
        return _paper_tiles(problem, tiling, halo)
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


def _paper_tiles(problem: Problem, tiling, halo):
    """:func:`hve_tiles` with the paper's halo: two extra rows of positions."""
    centre = problem.corners + np.asarray(problem.window) // 2
    _, step = fast_axis_step(problem.positions_m, problem.grid.pixel_size_m)
    margin = int(np.ceil(2 * max(step, 1.0)))
    h, w = problem.grid.shape
    specs = {}
    for t in tiling:
        y0, y1, x0, x1 = t.core
        cy, cx = centre[:, 0], centre[:, 1]
        pos = np.flatnonzero((cy >= y0 - margin) & (cy < y1 + margin) & (cx >= x0 - margin) & (cx < x1 + margin))
        if pos.size:
            ext = (max(0, min(y0, int(cy[pos].min()) - halo[0])), min(h, max(y1, int(cy[pos].max()) + halo[0] + 1)),
                   max(0, min(x0, int(cx[pos].min()) - halo[1])), min(w, max(x1, int(cx[pos].max()) + halo[1] + 1)))
        else:
            ext = t.core
        specs[t.key] = (pos, ext)
    return specs


class HVERun(TiledRun):
    """Engine ``hve``: each tile steps on its own extended region, then pastes its core
    into its neighbours' halos (:func:`~daskptycho.schedule.hve.hve_iteration`)."""

    def __init__(self, drv, problem, source, progress=None):
        tiling = tiling_for(problem)
        specs = hve_tiles(problem, tiling, halo_for(problem))
        self.extended = {k: ext for k, (_, ext) in specs.items()}
        super().__init__(drv, problem, source, progress, tiling, specs)

    def build_from(self, it, refine, states, probe, number=None):
        return hve_iteration(self.tiling, self.extended, it, states, self.data, probe, self.ctx,
                             self.problem.n_positions, tag=self.tag)


def run(drv, ds, problem, source, progress=None):
    """Run engine ``hve`` on the driver's cluster (the registry's signature)."""
    return problem, HVERun(drv, problem, source, progress).run()
