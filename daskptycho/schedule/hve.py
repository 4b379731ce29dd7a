"""Halo Voxel Exchange (the paper's baseline, section II-C) as a task graph.

Each tile reconstructs its extended region on its own, from every position whose
probe window reaches into its core (its own and its neighbours'); then every tile's
core voxels are pasted into the halos of the tiles whose extended regions hold them.
Keys: ``("hve-step", it, r, c)``, ``("hve-core", it, r, c, r2, c2)`` (the part of
(r, c)'s core that (r2, c2) needs), ``("hve-paste", it, r2, c2)``, ``("cost", it)``.
"""

from __future__ import annotations

import operator

from ..tasks import tiles as tt
from ..tiling import intersect
from .graph import IterationGraph


def hve_iteration(tiling, extended, it, states, data, probe, context, n_total, tag=None):
    """The task graph of one Halo Voxel Exchange iteration (pure: no client).

    Parameters
    ----------
    tiling : Tiling (its cores are used)
    extended : dict ``{(r, c): region}``: each tile's HVE extended region
    states, data : dicts ``{(r, c): key/future/value}``
    probe, context : key/future/value
    n_total : int, number of positions in the scan (sets the preconditioner floor)
    tag : hashable, optional
        Appended to every key (see :class:`~daskptycho.schedule.graph.IterationGraph`).

    Returns
    -------
    IterationGraph with outputs ``states``, ``probe`` (the input) and ``costs``.
    """
    g = IterationGraph(tag=tag)
    stepped = {}
    for t in tiling:
        stepped[t.key] = g.add(("hve-step", it, *t.key), (tt.hve_local_step, states[t.key], data[t.key], probe, context, t.key, n_total), t.key)
    costs = [g.add(("tile-cost", it, *t.key), (operator.getitem, stepped[t.key], "cost"), t.key) for t in tiling]
    new_states = {}
    for dst in tiling:
        pieces = []
        for src in tiling:
            if src.key == dst.key:
                continue
            region = intersect(src.core, extended[dst.key])
            if region is None:
                continue
            src_local = _local(extended[src.key], region)
            piece = g.add(("hve-core", it, *src.key, *dst.key), (tt.hve_cut, stepped[src.key], src_local), src.key)
            pieces.append((piece, _local(extended[dst.key], region)))
        new_states[dst.key] = g.add(("hve-paste", it, *dst.key), (
            tt.hve_paste, stepped[dst.key], [p for p, _ in pieces], [r for _, r in pieces]), dst.key)
    g.outputs.update(states=new_states, probe=probe, costs=[g.add(("cost", it), (sum, costs))])
    return g


def _local(ext, region):
    return (slice(region[0] - ext[0], region[1] - ext[0]), slice(region[2] - ext[2], region[3] - ext[2]))
