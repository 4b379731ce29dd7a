"""Engine ``gd``: image gradient decomposition over tiles pinned to workers."""

from __future__ import annotations

import uuid

import numpy as np

from ..io.checkpoint import Checkpoint, read_array, write_array
from ..schedule.passes import gd_iteration
from ..tiling import halo_from_metres, make_tiling
from . import tiletasks as tt
from .driver import WorkerLost
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
    # a position's cost counts in the tile that owns it (its core holds it), even where
    # other tiles hold it too (hve)
    owned = {t.key: t.positions for t in tiling}
    counted = {k: np.isin(pos, owned[k]) for k, (pos, _) in tiles.items()}
    counted = None if all(c.all() for c in counted.values()) else counted
    return tt.TileContext(
        kernel=problem.kernel, mask=problem.mask, window=problem.window, corners=rel, cost=o.cost,
        working_set=(o.working_set_mib, o.working_set_fraction), step=o.step, probe_step=o.probe_step, regularization=o.regularization,
        eps_per_position=problem.eps_object(1), device=o.device, local_batch=o.batch_size or 16,
        hve_minibatch=o.engine == "hve" and o.batch_size is not None, counted=counted,
    )


def run_tiles(drv, problem: Problem, source, tiling, tile_specs, build_iteration, progress=None):
    """Run a tiled engine: load and initialise each tile on its worker, then submit
    one iteration graph after another (keeping one iteration in flight ahead), and
    stitch the cores at the end.

    With ``checkpoint_every`` each tile's patch is written into the result store by
    its own worker every K iterations; with ``resume`` each tile reads its patch
    back from there. A worker lost during the run (its pinned tasks could never
    run) is noticed while waiting; the lost tiles move to live workers, every tile
    rolls back to the last checkpoint (or to the start without one) and the run
    goes on, so the result is exactly the undisturbed one.

    Parameters
    ----------
    tile_specs : dict ``{(r, c): (scan indices, extended region)}``
    build_iteration : callable(it, states, data, probe, context, refine) -> IterationGraph

    Returns
    -------
    object (S, H, W), probe (K, N, N), costs (list), memory report (dict), recoveries (list of dicts)
    """
    run = _TileRun(drv, problem, source, tiling, tile_specs, build_iteration, progress)
    while True:
        try:
            run.start()
            run.iterate()
            obj, probe, memory = run.finish()
            return obj, probe, run.costs, memory, run.recoveries
        except WorkerLost as e:
            run.recover(e)


class _TileRun:
    """The state of a tiled run on the client: futures of each tile's state and
    patterns, the probe, the costs so far, where each tile lives."""

    def __init__(self, drv, problem, source, tiling, specs, build, progress):
        from .. import config

        o = problem.options
        self.drv, self.problem, self.source, self.tiling, self.specs = drv, problem, source, tiling, specs
        self.build, self.progress = build, progress
        self.ck = Checkpoint(o.checkpoint) if o.checkpoint else None
        self.meta = self.ck.latest() if (self.ck is not None and o.resume) else None
        self.workers = drv.place_tiles([t.key for t in tiling])
        self.n_workers = len(drv.worker_addresses)
        self.max_recoveries = int(config.get("recovery.max_recoveries", 3))
        self.data, self.states, self.recoveries = {}, {}, []
        self.pending, self.saving = [], {}
        self.probe = self.ctx = None
        self.run_id = uuid.uuid4().hex[:8]
        self.live = ({t.key: _local_core(specs[t.key][1], t.core) for t in tiling}, {t.key: (t.core[0], t.core[2]) for t in tiling})
        drv.live_begin(o.engine, o.iterations, (tiling.rows, tiling.cols), o.passes_per_iteration if o.engine == "gd" else 1)

    def _key(self, name, *parts):
        # keys unique to this run and attempt (see :func:`retag`)
        return (name, *parts, self.tag)

    def start(self):
        """Scatter the context and probe; give each tile its patterns (kept where its
        worker lived on) and its state: from the checkpoint ``self.meta`` or the start."""
        drv, o, c = self.drv, self.problem.options, self.drv.client
        self.tag = f"{self.run_id}.{len(self.recoveries)}"
        # not broadcast: a broadcast retries for ever towards a worker that left during it;
        # each worker fetches the (small) context with its first task instead
        self.ctx = c.scatter(context_for(self.problem, self.tiling, tiles=self.specs), hash=False)
        meta = self.meta
        if meta is None:
            self.first, self.costs, probe = 0, [], self.problem.probe
        else:
            self.first = int(meta["completed"])
            self.costs = [float(v) for v in self.ck.read(meta, "cost")]
            probe = self.ck.read(meta, "probe")  # K x N x N: small
        self.probe = c.scatter(probe, hash=False)
        with drv.span("load"):
            for key, (pos, ext) in self.specs.items():
                w = self.workers[key]
                if key not in self.data:
                    self.data[key] = drv.submit_pinned(tt.load_tile_patterns, self.source, pos, o.device, worker=w,
                                                       key=self._key("load", *key))
                if meta is None:
                    self.states[key] = drv.submit_pinned(tt.initial_patch, o.slices, ext, o.device, worker=w, key=self._key("init", *key))
                else:  # each tile reads its own patch: the object never passes through the client
                    self.states[key] = drv.submit_pinned(read_array, meta["group"], _tile_name(key), None, o.device, worker=w,
                                                         key=self._key("restore", *key))

    def iterate(self):
        o, drv = self.problem.options, self.drv
        for it in range(self.first, o.iterations):
            refine = o.refine_probe and it >= o.probe_refine_start
            with drv.span("iteration"):
                g = retag(self.build(it, self.states, self.data, self.probe, self.ctx, refine), self.tag)
                new_probe = g.outputs["probe"] if refine else None
                wanted = [*g.outputs["states"].values(), *g.outputs["costs"]] + ([new_probe] if refine else [])
                fut = drv.submit_graph(g, self.workers, wanted)
            self.states = {k: fut[v] for k, v in g.outputs["states"].items()}
            if refine:
                self.probe = fut[new_probe]
            self.pending.append((it, [fut[k] for k in g.outputs["costs"]],
                                 drv.preview(it, self.states, self.live[0], self.workers, self.live[1])))
            del fut, g
            if o.checkpoint_every and ((it + 1) % o.checkpoint_every == 0 or it + 1 == o.iterations):
                self._save(it)
            if len(self.pending) > 1:  # report the previous iteration while this one runs
                self._report()
        while self.pending:
            self._report()

    def _save(self, it):
        """Start writing the checkpoint after iteration ``it``: one task per tile on its
        worker writes its patch; the pointer moves when the costs are in (:meth:`_report`)."""
        S = self.problem.options.slices
        arrays = {_tile_name(k): ((S, ext[1] - ext[0], ext[3] - ext[2]), np.complex64) for k, (_, ext) in self.specs.items()}
        arrays["probe"] = (self.problem.probe.shape, np.complex64)
        path = self.ck.begin(it + 1, arrays)
        futs = [self.drv.submit_pinned(write_array, path, _tile_name(k), self.states[k], worker=self.workers[k],
                                       key=self._key("checkpoint", it, *k)) for k in self.specs]
        futs.append(self.drv.client.submit(write_array, path, "probe", self.probe, key=self._key("checkpoint-probe", it), pure=False))
        self.saving[it] = (path, futs)

    def _report(self):
        it, futs, image = self.pending[0]
        previews = list(image["futures"].values()) if image else []
        self.drv.wait_alive(futs + previews, self.workers)
        self.pending.pop(0)
        cost = float(sum(self.drv.results(futs, self.workers)))  # rounds in a fixed order
        self.costs.append(cost)
        self.drv.publish(it, cost, image)
        if self.progress is not None:
            self.progress(it, cost)
        if it in self.saving:
            path, writes = self.saving.pop(it)
            self.drv.wait_alive(writes, self.workers)
            self.ck.commit(path, _checkpoint_attrs(self.problem, it + 1, tiles=sorted(f"{r},{c}" for r, c in self.specs)),
                           small={"cost": np.asarray(self.costs, dtype=np.float64)})

    def finish(self):
        drv = self.drv
        cores = {}
        for t in self.tiling:
            cores[t.key] = drv.submit_pinned(tt.core_of, self.states[t.key], _local_core(self.specs[t.key][1], t.core),
                                             worker=self.workers[t.key], key=self._key("core", *t.key))
        nb = [drv.submit_pinned(_tile_bytes, self.states[k], self.data[k], worker=self.workers[k], key=self._key("nbytes", *k))
              for k in self.states]
        got = drv.results([*cores.values(), self.probe, *nb], self.workers)
        cores = {k: np.asarray(v) for k, v in zip(cores, got)}
        obj = self.tiling.stitch_cores(cores)
        probe_final = np.asarray(got[len(cores)])
        nbytes = got[len(cores) + 1:]
        return obj, probe_final, drv.memory_report(dict(zip(self.states, nbytes)), self.workers)

    def recover(self, err):
        """After a lost worker: drop every pending future, move the lost tiles,
        roll every tile back to the last checkpoint (or the start) and log it."""
        from .recovery import roll_back

        # released, not cancelled: see roll_back
        self.states, self.pending, self.saving = {}, [], {}
        self.probe = self.ctx = None
        roll_back(self, err, units="tiles", label=lambda k: f"{k[0]},{k[1]}")


def retag(graph, tag):
    """``graph`` with every key ``k`` renamed ``(*k, tag)``, references inside tasks
    and outputs too: keys unique to one run (and one attempt after a recovery).

    A scheduler or worker may still know a key of an earlier run (or of the attempt
    a lost worker interrupted) when it comes back with other inputs, and distributed
    does not allow one key for two different computations.
    """
    from ..schedule.graph import IterationGraph

    names = {k: (*k, tag) if isinstance(k, tuple) else (k, tag) for k in graph.tasks}

    def sub(x):
        if isinstance(x, tuple) and x and callable(x[0]):  # a task: function and arguments
            return (x[0],) + tuple(sub(a) for a in x[1:])
        try:
            if x in names:
                return names[x]
        except TypeError:  # unhashable: arrays, slices, contexts
            pass
        if isinstance(x, tuple):
            return tuple(sub(a) for a in x)
        if isinstance(x, list):
            return [sub(a) for a in x]
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        return x

    out = IterationGraph()
    out.tasks = {names[k]: sub(t) for k, t in graph.tasks.items()}
    out.placement = {names[k]: v for k, v in graph.placement.items()}
    out.outputs = {k: sub(v) for k, v in graph.outputs.items()}
    return out


def _tile_name(key):
    return f"tile-{key[0]}-{key[1]}"


def _checkpoint_attrs(problem, completed, **extra):
    """What a checkpoint records besides its arrays: engine, iteration, options and the
    random state (the engines draw no random numbers after initialisation: the seed
    reproduces everything, minibatch orders come from ``(seed, iteration)``)."""
    import dataclasses

    o = problem.options
    return {"engine": o.engine, "completed": int(completed), "options": dataclasses.asdict(o), "seed": o.seed,
            "random_state": "none consumed after initialisation; minibatch orders are drawn from (seed, iteration)", **extra}


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

    obj, probe, costs, mem, recoveries = run_tiles(drv, problem, source, tiling, specs, build, progress)
    return obj, probe, costs, {"tiling": tiling, "memory": mem, "recoveries": recoveries}
