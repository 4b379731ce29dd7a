"""The multi-mode difference map: one iteration as a task graph (pure: no client).

Each part (a block of positions pinned to a worker with its views and patterns)
updates its views (eq. 3) and computes its partial sums of eq. 6 on its own region of
the object; a pairwise tree reduction sums them, each sum on the worker of its left
operand and only over the smallest box holding the regions summed so far; the object
lives on the worker of the first part (its *home*), where one task forms the new object
and the parts' crops are cut, so every part receives only the crop of the object its
positions touch. Each part computes its partial sums of eq. 5 with its crop, a second
tree reduction (placed alike) gives the new probe (orthogonalised) on the home worker,
and the probe goes to every part. Updating the object, then the probe from the new
object, is what keeps the bilinear probe/object split stable (simultaneous updates from
the same views drift and diverge).

Every task is placed, so what crosses workers is what must: the partial sums of the
parts of other workers (on their regions), the crops of those parts, the small probe
partials, the probe and mode mixing, and a few numbers.

Keys: ``("dm-views", it, 0, p)``, ``("dm-partial", it, 0, p)``, ``("dm-error", it, 0, p)``,
``("dm-state", it, 0, p)``, ``("dm-sum", it, level, i)``, ``("dm-object-update", it)``,
``("dm-object", it)``, ``("dm-object", it, 0, p)`` (part p's crop, cut from the object),
``("dm-crop", it, 0, p)`` (that crop on part p's worker), ``("dm-probe-partial", it, 0, p)``,
``("dm-probe-sum", it, level, i)``, ``("dm-probe-update", it)``, ``("dm-probe", it)``,
``("dm-mixing", it)``, ``("dm-summary", it)``, ``("cost", it)``. Parts are placed like
tiles of one row: ``(0, p)``.
"""

from __future__ import annotations

import operator

from ..tasks import dm as dt
from .graph import IterationGraph


def dm_iteration(parts, it, views, data, probe, crops, mixing, obj, context, regions, device="cpu",
                 update_probe=True, tag=None):
    """The graph of one DM iteration.

    Parameters
    ----------
    parts : list of part ids ``(0, p)``; the first is the object's home (see :func:`home`)
    views, data, crops : dicts ``{part: key/future/value}``
    probe, mixing, obj : key/future/value (``mixing`` may be None); ``obj`` and ``probe``
        should live on the home part's worker (the previous iteration leaves them there)
    context : key/future/value of a :class:`~daskptycho.tasks.dm.DMContext`
    regions : dict ``{part: (y0, y1, x0, x1)}``, what each part's windows touch
    update_probe : bool
        Also update the probe (eq. 5); off for the first iterations, while the
        object takes shape.
    tag : hashable, optional
        Appended to every key (see :class:`~daskptycho.schedule.graph.IterationGraph`).

    Returns
    -------
    IterationGraph with outputs ``states``, ``crops``, ``probe``, ``mixing``, ``object``,
    ``object_update``, ``probe_update``, ``summary``, ``costs``. Every task is placed: a
    part's own tasks on its worker, each sum on the worker of its left operand, the
    updates, the cutting of the crops and the small results on the home part's worker.
    """
    g = IterationGraph(tag=tag)
    at = home(parts)
    partials, errors, states = [], [], {}
    for part in parts:
        step = g.add(("dm-views", it, *part), (dt.part_step, views[part], data[part], probe, crops[part], mixing, context, part), part)
        partials.append((g.add(("dm-partial", it, *part), (operator.getitem, step, "partial"), part), part))
        errors.append(g.add(("dm-error", it, *part), (operator.getitem, step, "error"), part))
        states[part] = g.add(("dm-state", it, *part), (operator.getitem, step, "views"), part)
    total = placed_tree_sum(g, "dm-sum", it, partials, dt.add_partials)
    oupd = g.add(("dm-object-update", it), (dt.object_update, total, obj, context), at)
    new_obj = g.add(("dm-object", it), (operator.getitem, oupd, "object"), at)
    # each crop is cut where the object lives and copied where its part lives: only crops
    # travel, and the run keeps each crop on its part's worker alone (a crop kept on the
    # home worker too would be a replica the scheduler may drop on either side)
    new_crops = {}
    for p in parts:
        cut = g.add(("dm-object", it, *p), (dt.crop_object, new_obj, regions[p], device), at)
        new_crops[p] = g.add(("dm-crop", it, *p), (dt.crop_object, cut, None, device), p)
    if update_probe:
        pparts = [(g.add(("dm-probe-partial", it, *p), (dt.probe_partial, states[p], new_crops[p], context, p), p), p) for p in parts]
        ptotal = placed_tree_sum(g, "dm-probe-sum", it, pparts, dt.add_probe_partials)
        pupd = g.add(("dm-probe-update", it), (dt.probe_update, ptotal, probe, context), at)
    else:
        pupd = g.add(("dm-probe-update", it), (dt.probe_kept, probe), at)
    new_probe = g.add(("dm-probe", it), (operator.getitem, pupd, "probe"), at)
    new_mixing = g.add(("dm-mixing", it), (operator.getitem, pupd, "mixing"), at)
    summary = g.add(("dm-summary", it), (dt.summary, oupd, pupd), at)
    g.outputs.update(states=states, crops=new_crops, probe=new_probe, mixing=new_mixing, object=new_obj,
                     object_update=oupd, probe_update=pupd, summary=summary, costs=[g.add(("cost", it), (sum, errors), at)])
    return g


def home(parts):
    """The part whose worker holds the object, the probe and the global updates: the first."""
    return parts[0]


def placed_tree_sum(g, name, it, items, func):
    """A pairwise tree reduction like :meth:`IterationGraph.tree_sum` (the same pairs in the
    same order, so the same sums bit for bit), each sum placed on the worker of its left
    operand: parts of one worker are summed there, and a worker's sum crosses to another
    once. ``items``: ``[(key, part)]``. Tasks ``(name, it, level, i)``; returns the key of
    the total (on the first part's worker)."""
    level = 0
    while len(items) > 1:
        nxt = []
        for i in range(0, len(items), 2):
            if i + 1 < len(items):
                (a, part), (b, _) = items[i], items[i + 1]
                nxt.append((g.add((name, it, level, i // 2), (func, a, b), part), part))
            else:
                nxt.append(items[i])
        items = nxt
        level += 1
    return items[0][0]
