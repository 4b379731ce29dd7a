"""Engine ``dm``: the multi-mode difference map with positions split over workers."""

from __future__ import annotations

import numpy as np

from ..errors import OptionsError
from ..schedule.dm import dm_iteration
from . import dmtasks as dt
from . import tiletasks as tt
from .problem import Problem


def partition_positions(problem: Problem, k, how="blocks"):
    """Split the scan into ``k`` parts.

    ``blocks`` (default): spatially contiguous blocks, a near-square grid of parts
    over the positions sorted by y then x (so each part's object crop is small);
    ``index``: the paper's even split of the acquisition order.

    Returns a list of int arrays (scan indices), none empty.
    """
    j = problem.n_positions
    if not 1 <= k <= j:
        raise OptionsError("partitions", f"got {k}; expected between 1 and the number of positions ({j})")
    if how == "index":
        return [p for p in np.array_split(np.arange(j), k)]
    if how != "blocks":
        raise OptionsError("partition", f"got {how!r}; expected 'blocks' or 'index'")
    rows = max(1, int(np.floor(np.sqrt(k))))
    while k % rows:
        rows -= 1
    cols = k // rows
    pos = problem.positions_m
    order = np.lexsort((pos[:, 1], pos[:, 0]))
    parts = []
    for band in np.array_split(order, rows):
        band = band[np.argsort(pos[band, 1], kind="stable")]
        parts += [np.sort(p) for p in np.array_split(band, cols)]
    return parts


def _region(corners, window):
    return (int(corners[:, 0].min()), int(corners[:, 0].max()) + window[0],
            int(corners[:, 1].min()), int(corners[:, 1].max()) + window[1])


def run_dm(drv, problem: Problem, source, progress=None):
    """Run the DM engine on the driver's cluster.

    Returns object (L, H, W), probe (K, N, N), costs, and info (changes, fractions, memory).
    """
    o = problem.options
    if o.slices != 1:
        raise OptionsError("slices", "the difference map is a 2-D method: use slices=1 (engine 'gd' or 'ml' for multislice)")
    c = drv.client
    k = o.partitions or len(drv.worker_addresses)
    parts_idx = partition_positions(problem, k, o.partition)
    parts = [(0, p) for p in range(len(parts_idx))]
    workers = drv.place_tiles(parts)
    regions = {p: _region(problem.corners[idx], problem.window) for p, idx in zip(parts, parts_idx)}
    corners = {p: problem.corners[idx] - np.array([regions[p][0], regions[p][2]]) for p, idx in zip(parts, parts_idx)}
    ctx = dt.DMContext(mask=problem.mask, window=problem.window, corners=corners, regions=regions,
                       grid_shape=problem.grid.shape, beta=o.beta, device=o.device,
                       working_set=(o.working_set_mib, o.working_set_fraction))
    ctx_f = c.scatter(ctx, broadcast=True, hash=False)
    h, w = problem.grid.shape
    obj0 = np.ones((o.object_modes, h, w), np.complex64)
    if o.object_modes > 1:  # weak extra object modes, so they can grow
        obj0[1:] *= 0.1
    probe = c.scatter(problem.probe, hash=False)
    obj = c.scatter(obj0, hash=False)
    data, views, crops = {}, {}, {}
    with drv.span("load"):
        for p, idx in zip(parts, parts_idx):
            data[p] = drv.submit_pinned(tt.load_tile_patterns, source, idx, o.device, worker=workers[p], key=("load", *p))
            crops[p] = drv.submit_pinned(dt.crop_object, obj0, regions[p], o.device, worker=workers[p], key=("crop-init", *p))
            views[p] = drv.submit_pinned(dt.init_views, probe, crops[p], ctx_f, p, worker=workers[p], key=("views-init", *p))
    mixing = None
    costs, updates = [], []
    for it in range(o.iterations):
        with drv.span("iteration"):
            g = dm_iteration(parts, it, views, data, probe, crops, mixing, obj, ctx_f, problem.grid.shape, regions, o.device,
                             update_probe=it >= o.probe_refine_start)
            out = g.outputs
            wanted = [*out["states"].values(), *out["crops"].values(), out["probe"], out["mixing"], out["object"],
                      out["object_update"], out["probe_update"], *out["costs"]]
            fut = drv.submit_graph(g, workers, wanted)
        views = {p: fut[kk] for p, kk in out["states"].items()}
        crops = {p: fut[kk] for p, kk in out["crops"].items()}
        probe, mixing, obj = fut[out["probe"]], fut[out["mixing"]], fut[out["object"]]
        cost = float(fut[out["costs"][0]].result())
        upd = c.submit(_summary, fut[out["object_update"]], fut[out["probe_update"]], pure=False).result()
        costs.append(cost)
        updates.append(upd)
        if progress is not None:
            progress(it, cost)
        del fut, g
    final_obj = np.asarray(obj.result())
    final_probe = np.asarray(probe.result())
    nbytes = c.gather([drv.submit_pinned(_part_bytes, views[p], data[p], crops[p], worker=workers[p], key=("nbytes", *p)) for p in parts])
    memory = drv.memory_report(dict(zip(parts, nbytes)), workers)
    info = {
        "probe_change": np.array([u["probe_change"] for u in updates]),
        "object_change": np.array([u["object_change"] for u in updates]),
        "fractions": updates[-1]["fractions"] if updates else np.ones(1),
        "memory": memory,
        "partitions": [idx.tolist() for idx in parts_idx],
    }
    return final_obj, final_probe, costs, info


def _summary(oupd, pupd):
    """The small per-iteration figures of the global updates (not the arrays)."""
    return {"probe_change": np.asarray(pupd["probe_change"]), "object_change": oupd["object_change"],
            "fractions": np.asarray(pupd["fractions"])}


def _part_bytes(views, data, crop):
    """Bytes a part holds: its views, patterns and object crop."""
    return {"views": int(views.nbytes), "patterns": int(data.nbytes), "object": int(crop.nbytes)}
