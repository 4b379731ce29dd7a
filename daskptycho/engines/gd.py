"""Engine ``gd``: image gradient decomposition over tiles pinned to workers, and the
tiled run it shares with ``hve``."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass

import numpy as np

from .. import config
from ..backend import to_host
from ..errors import OptionsError
from ..io.checkpoint import read_array, write_array
from ..physics.probe import support_half_widths
from ..schedule.fuse import Input, Ref, fuse_by_worker, rebind, stage_bodies
from ..schedule.graph import IterationGraph
from ..schedule.passes import gd_iteration
from ..tasks import tiles as tt
from ..tasks.stage import take
from ..tiling import halo_from_metres, make_tiling
from .options import Number, TiledOptions, boolean, option
from .problem import Problem
from .run import PinnedRun, RunOutput, Step


@dataclass(kw_only=True)
class GDOptions(TiledOptions):
    """Options of engine ``gd`` (image gradient decomposition).

    Attributes
    ----------
    local_updates : bool
        Step each tile after each minibatch of ``batch_size`` of its own positions
        (None: all of them) between passes (Alg. 1, lines 5-9); off: batch mode,
        exactly full-batch gradient descent.
    passes_per_iteration : int
        Pass rounds per iteration (the paper's T).
    """

    ENGINE = "gd"
    engine: str = "gd"
    local_updates: bool = option(boolean, False)
    passes_per_iteration: int = option(Number(True, 1), 1)


FUSE = ("auto", "always", "never")
EXCHANGE = ("scheduler", "peer")


def exchange_mode():
    """How the values one worker's tiles hand another's travel (``daskptycho.schedule.exchange``):
    ``scheduler``, as tasks the scheduler places (the tile graph, or fused stages and their
    messages), or ``peer``: fused stages that send them worker to worker
    (:mod:`~daskptycho.tasks.peer`), one stage per worker and iteration."""
    value = config.get("schedule.exchange", "peer") or "peer"
    if value not in EXCHANGE:
        raise OptionsError("schedule.exchange", f"is {value!r}; use one of {', '.join(EXCHANGE)} (daskptycho.yaml or DASK_DASKPTYCHO__SCHEDULE__EXCHANGE)")
    return value


def fuse_for(placement):
    """Whether an iteration's tile graph runs fused, a few tasks per worker
    (:func:`~daskptycho.schedule.fuse.fuse_by_worker`): ``daskptycho.schedule.fuse``,
    ``always``, ``never`` or ``auto`` (default: when a worker holds 4 tiles or more, where
    the tiles' own tasks would dominate the scheduler's work; with fewer, the tile graph's
    tasks stay visible one by one in the task stream and the live page's tile progress).

    Parameters
    ----------
    placement : dict ``{tile: worker}``
    """
    value = config.get("schedule.fuse", "auto") or "auto"
    if value not in FUSE:
        raise OptionsError("schedule.fuse", f"is {value!r}; use one of {', '.join(FUSE)} (daskptycho.yaml or DASK_DASKPTYCHO__SCHEDULE__FUSE)")
    if value == "auto":
        return max(collections.Counter(placement.values()).values(), default=0) >= 4
    return value == "always"


def halo_for(problem: Problem):
    """Each tile's halo (pixels per axis), or None for whole windows.

    ``halo_m`` when given; ``halo="window"``: None (every window whole); ``halo="probe"``:
    the probe's support (:func:`~daskptycho.physics.probe.support_half_widths` at
    ``halo_fraction``) widened by the farthest a wave travels sideways through the slab,
    ``(S - 1) dz tan(theta_max)`` with ``theta_max = lambda / (2 dx)``, the largest angle
    the grid represents; never wider than the windows need.
    """
    o = problem.options
    if o.halo_m is not None:
        return halo_from_metres(o.halo_m, problem.grid.pixel_size_m)
    if o.halo == "window":
        return None
    dx = problem.grid.pixel_size_m
    spread = (o.slices - 1) * problem.slice_thickness_m * problem.wavelength_m / (2 * dx * dx)
    support = support_half_widths(problem.probe, o.halo_fraction)
    ny, nx = problem.window
    need = (max(ny // 2, ny - ny // 2 - 1), max(nx // 2, nx - nx // 2 - 1))
    return tuple(min(n, r + int(np.ceil(spread))) for n, r in zip(need, support))


def tiling_for(problem: Problem):
    """The tile grid of a run: cores over the scanned field, halos from :func:`halo_for`."""
    o = problem.options
    return make_tiling(problem.grid, problem.corners, problem.window, o.tiles, halo_for(problem), clip_windows=True)


def window_pads(corners_rel, window, shape):
    """How far windows (corners relative to an extended region of ``shape``) reach past it:
    ``(top, bottom, left, right)`` pixels, or None when they all lie inside."""
    if len(corners_rel) == 0:
        return None
    ny, nx = window
    h, w = shape
    top, left = (max(0, int(-corners_rel[:, a].min())) for a in (0, 1))
    bottom = max(0, int((corners_rel[:, 0] + ny).max()) - h)
    right = max(0, int((corners_rel[:, 1] + nx).max()) - w)
    return (top, bottom, left, right) if top or bottom or left or right else None


def context_for(problem: Problem, tiling, tiles=None):
    """The :class:`~daskptycho.tasks.tiles.TileContext` of a run (window corners relative
    to each tile, or to its extended region padded to hold the windows where they reach
    past it). ``tiles``: ``{(r, c): (scan indices, extended region)}`` where tiles hold
    other positions than their own (hve); default: the tiling's own."""
    o = problem.options
    tiles = tiles if tiles is not None else {t.key: (t.positions, t.extended) for t in tiling}
    rel, pads = {}, {}
    for k, (pos, ext) in tiles.items():
        r = problem.corners[pos] - np.array([ext[0], ext[2]])
        pad = window_pads(r, problem.window, (ext[1] - ext[0], ext[3] - ext[2]))
        if pad is not None:
            pads[k] = pad
            r = r + np.array([pad[0], pad[2]])
        rel[k] = r
    # a position's cost counts in the tile that owns it (its core holds it), even where
    # other tiles hold it too (hve)
    owned = {t.key: t.positions for t in tiling}
    counted = {k: np.isin(pos, owned[k]) for k, (pos, _) in tiles.items()}
    counted = None if all(c.all() for c in counted.values()) else counted
    return tt.TileContext(
        kernel=problem.kernel, mask=problem.mask, window=problem.window, corners=rel, cost=o.cost,
        working_set=(o.working_set_mib, o.working_set_fraction), step=o.step, probe_step=o.probe_step, regularization=o.regularization,
        eps_per_position=problem.eps_object(1), device=o.device, local_batch=o.batch_size,
        hve_minibatch=o.engine == "hve" and o.batch_size is not None, counted=counted, pads=pads or None,
    )


class TiledRun(PinnedRun):
    """A run over tiles pinned to workers (gd, hve): each tile holds its extended patch
    of the object and its own patterns; the probe is one small future.

    Parameters
    ----------
    tiling : :class:`~daskptycho.tiling.Tiling`
    specs : dict ``{(r, c): (scan indices, extended region)}``
    """

    def __init__(self, drv, problem, source, progress, tiling, specs):
        self.tiling, self.specs = tiling, specs
        self.units = {k: pos for k, (pos, _) in specs.items()}
        self.live_grid = (tiling.rows, tiling.cols)
        self.live_rounds = problem.options.passes_per_iteration if problem.options.engine == "gd" else 1
        self.cores = {t.key: _local_core(specs[t.key][1], t.core) for t in tiling}
        self.origins = {t.key: (t.core[0], t.core[2]) for t in tiling}
        self.states, self.probe, self.ctx = {}, None, None
        self._ahead, self.exchange, self._blocks = {}, "scheduler", {}
        super().__init__(drv, problem, source, progress)

    def build_from(self, it, refine, states, probe):
        """The :class:`~daskptycho.schedule.graph.IterationGraph` of iteration ``it`` from
        the tiles' ``states`` and the ``probe`` (futures, keys or
        :class:`~daskptycho.schedule.fuse.Input` objects)."""
        raise NotImplementedError

    def begin(self, meta):
        o, c = self.problem.options, self.drv.client
        self.exchange = exchange_mode()
        if self.exchange == "peer":
            self.drv.peer_exchange()
            # a block's costs come out of the stages that also ran its updates
            self.tiles_done_with_cost = len(set(self.workers.values())) > 1
        # not broadcast: a broadcast retries for ever towards a worker that left during it;
        # each worker fetches the (small) context with its first task instead
        self.ctx = c.scatter(context_for(self.problem, self.tiling, tiles=self.specs), hash=False)
        probe = self.problem.probe if meta is None else self.ck.read(meta, "probe")  # K x N x N: small
        self.probe = c.scatter(probe, hash=False)
        with self.drv.span("load"):
            for key, (_, ext) in self.specs.items():
                w = self.workers[key]
                if meta is None:
                    self.states[key] = self.drv.submit_pinned(tt.initial_patch, o.slices, ext, o.device, self.problem.start_patch(ext),
                                                              worker=w, key=self.key("init", *key))
                else:  # each tile reads its own patch: the object never passes through the client
                    self.states[key] = self.drv.submit_pinned(read_array, meta["group"], _tile_name(key), None, o.device, worker=w,
                                                              key=self.key("restore", *key))

    def block_of(self, it):
        """The iterations submitted together from ``it``: with peer exchange up to
        ``daskptycho.schedule.block_iterations`` of them, fused into one stage per worker
        (their costs come back together), never past a checkpoint or the last iteration;
        otherwise ``it`` alone."""
        o = self.problem.options
        if self.exchange != "peer":
            return [it]
        k = config.get("schedule.block_iterations", 8)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise OptionsError("schedule.block_iterations", f"is {k!r}; use an integer >= 1 (daskptycho.yaml or DASK_DASKPTYCHO__SCHEDULE__BLOCK_ITERATIONS)")
        end = min(o.iterations, it + k)
        if o.checkpoint_every:
            end = min(end, (it // o.checkpoint_every + 1) * o.checkpoint_every)
        return list(range(it, end))

    def step(self, it):
        ahead = self._ahead.pop(it, None)
        if ahead is not None:  # submitted with an earlier iteration's block
            return ahead
        o = self.problem.options
        block = self.block_of(it)
        refine = tuple(o.refine_probe and i >= o.probe_refine_start for i in block)
        if self.exchange == "peer" and len(set(self.workers.values())) > 1:
            return self._peer_step(block, refine)
        # the block's iterations as one graph: each iteration's graph reads the previous one's keys
        g, out = self._block_graph(block, refine, self.states, self.probe)
        wanted = out["wanted"]
        if not fuse_for(self.workers):
            fut = self.drv.submit_graph(g, self.workers, wanted)
            got = {k: fut[k] for k in wanted}
        else:  # a few tasks per worker, however many tiles it holds (schedule/fuse.py)
            fused, where = fuse_by_worker(g, it, self.workers, wanted, external=self.drv.is_future)
            got = self._submit_fused(fused, where)
        return self._took(block, out, got)

    def _block_graph(self, block, refine, states, probe):
        """The tile graph of ``block``'s iterations (each reading the previous one's keys)
        from ``states`` and ``probe``, and what comes out of it: ``states`` ({tile: key}),
        ``costs`` ({iteration: [keys]}), ``probe`` (key, or None without refinement) and
        ``wanted`` (all of those)."""
        g = IterationGraph(tag=self.tag)
        costs, new_probe = {}, None
        for i, r in zip(block, refine):
            gi = self.build_from(i, r, states, probe)
            g.tasks.update(gi.tasks)
            g.placement.update(gi.placement)
            costs[i] = gi.outputs["costs"]
            states = gi.outputs["states"]
            if r:
                probe = new_probe = gi.outputs["probe"]
        wanted = [*states.values(), *(c for i in block for c in costs[i])] + ([new_probe] if new_probe is not None else [])
        return g, {"states": states, "costs": costs, "probe": new_probe, "wanted": wanted}

    def _peer_step(self, block, refine):
        """Submit a block with peer exchange. Its fused graph is built once per shape (the
        number of iterations and where the probe is refined) and bound again to each
        later block's inputs (:func:`~daskptycho.schedule.fuse.rebind`): a run's blocks
        differ only in their keys' numbers, inputs and message channel. The stages' bodies
        are kept on their workers, so a block's graph is a few small tasks per worker
        whatever the number of tiles."""
        it, rounds = block[0], self.live_rounds
        shape = (len(block), refine)
        inputs = {("state", k): v for k, v in self.states.items()}
        inputs["probe"] = self.probe
        channel = f"{self.tag}|{it}"
        if shape not in self._blocks:
            g, out = self._block_graph(block, refine, {k: Input(("state", k)) for k in self.states}, Input("probe"))
            fused, where = fuse_by_worker(g, it * rounds, self.workers, out["wanted"],
                                          external=lambda x: isinstance(x, Input) or self.drv.is_future(x), channel=channel,
                                          peer_timeout_s=float(config.get("schedule.peer_timeout_s", 300)))
            out["costs"] = [out["costs"][i] for i in block]  # by position in the block
            # the stages' bodies (every tile's tasks) go to their workers once and stay there
            bodies = stage_bodies(fused)
            held = self.drv.submit_graph(bodies, self.workers, list(bodies.tasks))
            held = {("stage", *k[1:]): f for k, f in held.items()}
            self._blocks[shape] = (it, fused, where, out, held)
        first, fused, where, out, held = self._blocks[shape]
        fused, where = rebind(fused, where, (it - first) * rounds, inputs, channel, bodies=held)
        got = self._submit_fused(fused, where)
        return self._took(block, {**out, "costs": dict(zip(block, out["costs"]))}, got)

    def _submit_fused(self, fused, where):
        need = list(dict.fromkeys(w.source if isinstance(w, Ref) else w for w in where.values()))
        fut = self.drv.submit_graph(fused, self.workers, need)
        return {k: Ref(fut[w.source], w.name, w.tile) if isinstance(w, Ref) else fut[w] for k, w in where.items()}

    def _took(self, block, out, got):
        """Keep a submitted block's results: the tiles' states, the probe, and a
        :class:`Step` per iteration (the later ones handed out as the run asks for them)."""
        self.states = {k: got[v] for k, v in out["states"].items()}
        if out["probe"] is not None:
            self.probe = got[out["probe"]]
        costs = out["costs"]
        # a block's later iterations are reported as they come; keep them all in flight
        self.lookahead = max(type(self).lookahead, len(block))
        self._ahead = {i: Step(i, [got[k] for k in costs[i]]) for i in block[1:]}
        return Step(block[0], [got[k] for k in costs[block[0]]])

    def _state(self, key):
        """Tile ``key``'s state as a future (a fused iteration's state is a value inside
        its worker's stage result: taken out there, by a task on that worker)."""
        st = self.states[key]
        if not isinstance(st, Ref):
            return st
        self._takes = getattr(self, "_takes", 0) + 1
        return self.drv.submit_pinned(take, st.source, st.name, worker=self.workers[key],
                                      key=self.key("pick", "state", self._takes, *key))

    def _state_futures(self):
        return {k: self._state(k) for k in self.states}

    def preview(self, it):
        if not self.live.due(it):
            return None
        return self.live.preview(it, self._state_futures(), self.workers, self.cores, self.origins)

    def checkpoint_arrays(self):
        s = self.problem.options.slices
        arrays = {_tile_name(k): ((s, ext[1] - ext[0], ext[3] - ext[2]), np.complex64) for k, (_, ext) in self.specs.items()}
        arrays["probe"] = (self.problem.probe.shape, np.complex64)
        return arrays

    def checkpoint_writes(self, path, it):
        writes = [self.drv.submit_pinned(write_array, path, _tile_name(k), self._state(k), worker=self.workers[k],
                                         key=self.key("checkpoint", it, *k)) for k in self.specs]
        writes.append(self.drv.client.submit(write_array, path, "probe", self.probe, key=self.key("checkpoint-probe", it), pure=False))
        return writes, {}

    def checkpoint_attrs(self, small):
        return {"tiles": sorted(f"{r},{c}" for r, c in self.specs)}

    def finish(self):
        self.states = self._state_futures()
        cores = {t.key: self.drv.submit_pinned(tt.core_of, self.states[t.key], self.cores[t.key], worker=self.workers[t.key],
                                               key=self.key("core", *t.key)) for t in self.tiling}
        probe = self.drv.client.submit(to_host, self.probe, key=self.key("host", "probe"), pure=False)
        got = self.drv.results([*cores.values(), probe], self.workers)
        # the border no tile holds keeps the starting object (tasks.tiles.initial_patch: ones)
        obj = self.tiling.stitch_cores({k: np.asarray(v) for k, v in zip(cores, got)}, fill=1)
        t = self.tiling
        attrs = {
            "tiles": f"{t.rows}x{t.cols}",
            "halo_px": list(t.halo),
            "halo": "metres" if self.problem.options.halo_m is not None else self.problem.options.halo,
            "halo_fraction": float(self.problem.options.halo_fraction),
            "tile_cores": json.dumps({f"{x.row},{x.col}": list(map(int, x.core)) for x in t}),
            "tile_extended": json.dumps({f"{x.row},{x.col}": list(map(int, x.extended)) for x in t}),
            "memory": json.dumps(self.memory(self.states)),
            "recoveries": json.dumps(self.recoveries),
        }
        return RunOutput(obj, np.asarray(got[-1]), self.costs, attrs)

    def drop(self):
        self.states, self.probe, self.ctx = {}, None, None
        self._ahead, self.lookahead, self._blocks = {}, type(self).lookahead, {}


class GDRun(TiledRun):
    """Engine ``gd``: per-tile gradients, the four strip passes, per-tile updates
    (:func:`~daskptycho.schedule.passes.gd_iteration`)."""

    def __init__(self, drv, problem, source, progress=None):
        tiling = tiling_for(problem)
        super().__init__(drv, problem, source, progress, tiling, {t.key: (t.positions, t.extended) for t in tiling})

    def build_from(self, it, refine, states, probe):
        o = self.problem.options
        return gd_iteration(self.tiling, it, states, self.data, probe, self.ctx, rounds=o.passes_per_iteration,
                            refine_probe=refine, local_updates=o.local_updates, tag=self.tag)


def _tile_name(key):
    return f"tile-{key[0]}-{key[1]}"


def _local_core(ext, core):
    return (slice(core[0] - ext[0], core[1] - ext[0]), slice(core[2] - ext[2], core[3] - ext[2]))


def run(drv, ds, problem, source, progress=None):
    """Run engine ``gd`` on the driver's cluster (the registry's signature)."""
    return problem, GDRun(drv, problem, source, progress).run()
