"""Engine ``gd``: image gradient decomposition over tiles pinned to workers."""

from __future__ import annotations

import numpy as np

from ..schedule.passes import gd_iteration
from ..tiling import halo_from_metres, make_tiling
from . import tiletasks as tt
from .problem import Problem


def tiling_for(problem: Problem):
    o = problem.options
    return make_tiling(problem.grid, problem.corners, problem.window, o.tiles,
                       halo_from_metres(o.halo_m, problem.grid.pixel_size_m))


def context_for(problem: Problem, tiling, corners=None, tiles=None):
    """The broadcast :class:`TileContext` of a run (window corners relative to each tile)."""
    o = problem.options
    tiles = tiles if tiles is not None else {t.key: (t.positions, t.extended) for t in tiling}
    rel = {k: problem.corners[pos] - np.array([ext[0], ext[2]]) for k, (pos, ext) in tiles.items()}
    return tt.TileContext(
        kernel=problem.kernel, mask=problem.mask, window=problem.window, corners=rel, cost=o.cost,
        working_set=(o.working_set_mib, o.working_set_fraction), step=o.step, probe_step=o.probe_step, regularization=o.regularization,
        eps_per_position=problem.eps_object(1), device=o.device, local_batch=o.batch_size or 16,
        hve_minibatch=o.engine == "hve" and o.batch_size is not None,
    )


def run_tiles(drv, problem: Problem, source, tiling, tile_specs, build_iteration, progress=None):
    """Run a tiled engine: load and initialise each tile on its worker, then submit
    one iteration graph after another (keeping one iteration in flight ahead), and
    stitch the cores at the end.

    Parameters
    ----------
    tile_specs : dict ``{(r, c): (scan indices, extended region)}``
    build_iteration : callable(it, states, data, probe, context, refine) -> IterationGraph
    """
    o = problem.options
    c = drv.client
    workers = drv.place_tiles([t.key for t in tiling])
    ctx = c.scatter(context_for(problem, tiling, tiles=tile_specs), broadcast=True, hash=False)
    probe = c.scatter(problem.probe, hash=False)
    start = problem.initial_object(np)
    data, states = {}, {}
    with drv.span("load"):
        for key, (pos, ext) in tile_specs.items():
            data[key] = drv.submit_pinned(tt.load_tile_patterns, source, pos, o.device, worker=workers[key], key=("load", *key))
            states[key] = drv.submit_pinned(tt.initial_patch, start, ext, o.device, worker=workers[key], key=("init", *key))
    costs, pending = [], []
    for it in range(o.iterations):
        refine = o.refine_probe and it >= o.probe_refine_start
        with drv.span("iteration"):
            g = build_iteration(it, states, data, probe, ctx, refine)
            new_probe = g.outputs["probe"] if refine else None
            wanted = [*g.outputs["states"].values(), *g.outputs["costs"]] + ([new_probe] if refine else [])
            fut = drv.submit_graph(g, workers, wanted)
        states = {k: fut[v] for k, v in g.outputs["states"].items()}
        if refine:
            probe = fut[new_probe]
        pending.append((it, [fut[k] for k in g.outputs["costs"]]))
        del fut, g
        if len(pending) > 1:  # report the previous iteration while this one runs
            _report(pending.pop(0), costs, progress)
    while pending:
        _report(pending.pop(0), costs, progress)
    cores = {}
    for t in tiling:
        cores[t.key] = drv.submit_pinned(tt.core_of, states[t.key], _local_core(tile_specs[t.key][1], t.core),
                                         worker=workers[t.key], key=("core", *t.key))
    cores = {k: np.asarray(v) for k, v in zip(cores, c.gather(list(cores.values())))}
    obj = tiling.stitch_cores(cores)
    probe_final = np.asarray(probe.result() if hasattr(probe, "result") else probe)
    nbytes = c.gather([drv.submit_pinned(_tile_bytes, states[k], data[k], worker=workers[k], key=("nbytes", *k)) for k in states])
    return obj, probe_final, costs, drv.memory_report(dict(zip(states, nbytes)), workers)


def _report(item, costs, progress):
    it, futs = item
    cost = float(sum(f.result() for f in futs))
    costs.append(cost)
    if progress is not None:
        progress(it, cost)


def _local_core(ext, core):
    return (slice(core[0] - ext[0], core[1] - ext[0]), slice(core[2] - ext[2], core[3] - ext[2]))


def _tile_bytes(state, data):
    """Bytes of state a tile holds: object patch, accumulated buffer (complex
    gradient + real illumination, same extent), diffraction patterns."""
    obj = int(state.nbytes)
    return {"object": obj, "buffer": obj + obj // 2, "patterns": int(data.nbytes)}


def run_gd(drv, problem: Problem, source, progress=None):
    o = problem.options
    tiling = tiling_for(problem)
    specs = {t.key: (t.positions, t.extended) for t in tiling}

    def build(it, states, data, probe, ctx, refine):
        return gd_iteration(tiling, it, states, data, probe, ctx, rounds=o.passes_per_iteration,
                            refine_probe=refine, local_updates=o.local_updates)

    obj, probe, costs, mem = run_tiles(drv, problem, source, tiling, specs, build, progress)
    return obj, probe, costs, {"tiling": tiling, "memory": mem}
