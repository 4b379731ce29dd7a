"""The multi-mode difference map: one iteration as a task graph (pure: no client).

Each part (a block of positions pinned to a worker with its views and patterns)
updates its views (eq. 3) and computes its partial sums of eq. 6; a pairwise tree
reduction sums them and one task forms the new object; every part gets back only
the crop of the object its positions touch, computes its partial sums of eq. 5
with it, and a second tree reduction gives the new probe (orthogonalised), which
goes to every part. Updating the object, then the probe from the new object, is
what keeps the bilinear probe/object split stable (simultaneous updates from the
same views drift and diverge).

Keys: ``("dm-views", it, 0, p)``, ``("dm-partial", it, 0, p)``, ``("dm-error", it, 0, p)``,
``("dm-state", it, 0, p)``, ``("dm-sum", it, level, i)``, ``("dm-object-update", it)``,
``("dm-object", it)``, ``("dm-crop", it, 0, p)``, ``("dm-probe-partial", it, 0, p)``,
``("dm-probe-sum", it, level, i)``, ``("dm-probe-update", it)``, ``("dm-probe", it)``,
``("dm-mixing", it)``, ``("cost", it)``. Parts are placed like tiles of one row: ``(0, p)``.
"""

from __future__ import annotations

import operator
from functools import partial

from ..tasks import dm as dt
from .graph import IterationGraph


def dm_iteration(parts, it, views, data, probe, crops, mixing, obj, context, grid_shape, regions, device="cpu",
                 update_probe=True, tag=None):
    """The graph of one DM iteration.

    Parameters
    ----------
    parts : list of part ids ``(0, p)``
    views, data, crops : dicts ``{part: key/future/value}``
    probe, mixing, obj : key/future/value (``mixing`` may be None)
    context : key/future/value of a :class:`~daskptycho.tasks.dm.DMContext`
    grid_shape : (H, W)
    regions : dict ``{part: (y0, y1, x0, x1)}``, what each part's windows touch
    update_probe : bool
        Also update the probe (eq. 5); off for the first iterations, while the
        object takes shape.
    tag : hashable, optional
        Appended to every key (see :class:`~daskptycho.schedule.graph.IterationGraph`).

    Returns
    -------
    IterationGraph with outputs ``states``, ``crops``, ``probe``, ``mixing``, ``object``,
    ``object_update``, ``probe_update``, ``costs``.
    """
    g = IterationGraph(tag=tag)
    partials, errors, states = [], [], {}
    for part in parts:
        step = g.add(("dm-views", it, *part), (dt.part_step, views[part], data[part], probe, crops[part], mixing, context, part), part)
        partials.append(g.add(("dm-partial", it, *part), (operator.getitem, step, "partial"), part))
        errors.append(g.add(("dm-error", it, *part), (operator.getitem, step, "error"), part))
        states[part] = g.add(("dm-state", it, *part), (operator.getitem, step, "views"), part)
    total = g.tree_sum("dm-sum", it, partials, partial(dt.add_partials, grid_shape=grid_shape))
    oupd = g.add(("dm-object-update", it), (dt.object_update, total, obj, context))
    new_obj = g.add(("dm-object", it), (operator.getitem, oupd, "object"))
    new_crops = {p: g.add(("dm-crop", it, *p), (dt.crop_object, new_obj, regions[p], device)) for p in parts}
    if update_probe:
        pparts = [g.add(("dm-probe-partial", it, *p), (dt.probe_partial, states[p], new_crops[p], context, p), p) for p in parts]
        ptotal = g.tree_sum("dm-probe-sum", it, pparts, dt.add_probe_partials)
        pupd = g.add(("dm-probe-update", it), (dt.probe_update, ptotal, probe, context))
    else:
        pupd = g.add(("dm-probe-update", it), (dt.probe_kept, probe))
    new_probe = g.add(("dm-probe", it), (operator.getitem, pupd, "probe"))
    new_mixing = g.add(("dm-mixing", it), (operator.getitem, pupd, "mixing"))
    g.outputs.update(states=states, crops=new_crops, probe=new_probe, mixing=new_mixing, object=new_obj,
                     object_update=oupd, probe_update=pupd, costs=[g.add(("cost", it), (sum, errors))])
    return g
