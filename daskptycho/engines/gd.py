"""Engine ``gd``: image gradient decomposition over tiles pinned to workers, and the
tiled run it shares with ``hve``."""

from __future__ import annotations

import collections
import json
import operator
from dataclasses import dataclass

import numpy as np

from .. import config
from ..backend import to_host
from ..errors import OptionsError
from ..io.checkpoint import read_array, write_array
from ..physics.positions import position_margin_px
from ..physics.probe import support_half_widths
from ..schedule.fuse import Input, Ref, fuse_by_worker, one_cost_task, rebind, stage_bodies
from ..schedule.graph import IterationGraph
from ..schedule.passes import PROBE_STEPPERS, gd_iteration
from ..tasks import tiles as tt
from ..tasks.ml import refines_positions
from ..tasks.stage import take
from ..tasks.tiles import window_pads
from ..tasks.updates import minibatches
from ..tiling import halo_from_metres, make_tiling
from .ml import result_variables
from .options import MinibatchOptions, Number, PositionOptions, TiledOptions, boolean, option
from .problem import Problem
from .run import PinnedRun, RunOutput, Step


@dataclass(kw_only=True)
class GDOptions(MinibatchOptions, TiledOptions, PositionOptions):
    """Options of engine ``gd`` (image gradient decomposition).

    Attributes
    ----------
    local_updates : bool
        Step each tile after each minibatch of ``batch_size`` of its own positions
        (None: all of them) between passes (Alg. 1, lines 5-9). Off (default): the
        minibatches are pass rounds instead (``passes_per_iteration``).
    passes_per_iteration : int or "auto"
        Pass rounds per iteration (the paper's T): each round takes a share of every
        tile's positions (of a random order drawn anew each iteration,
        :func:`~daskptycho.tasks.tiles.round_group`), exchanges the strips and steps every tile, so T rounds
        are the minibatch updates of T minibatches spread over the whole object.
        ``"auto"`` (default): in the minibatch iterations
        (:meth:`~daskptycho.engines.options.MinibatchOptions.batch_at`) as many rounds as
        the largest tile's positions make minibatches of ``batch_size``
        (:func:`~daskptycho.tasks.updates.minibatches`; ``"auto"``: 4), 1 after them (and
        always 1 with ``local_updates``), so the run ends in batch mode.

    The position-correction options are :class:`~daskptycho.engines.options.PositionOptions`'s:
    each tile refines the positions it owns on its own extended patch
    (:func:`~daskptycho.tasks.tiles.tile_positions`), and its halo grows by
    ``ceil(position_max_shift_px) + 1`` pixels (:func:`tiling_for`).
    """

    ENGINE = "gd"
    engine: str = "gd"

    def rounds_at(self, it, tile_positions):
        """Pass rounds of iteration ``it`` (0-based) when the largest tile holds
        ``tile_positions`` positions (see ``passes_per_iteration``)."""
        if self.passes_per_iteration != "auto":
            return self.passes_per_iteration
        if self.local_updates:  # batch_size sets the tiles' local minibatches instead
            return 1
        return minibatches(tile_positions, self.batch_at(it))
    local_updates: bool = option(boolean, False)
    passes_per_iteration: int | str = option(lambda n, v: v if v == "auto" else Number(True, 1)(n, v), "auto")


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


def probe_steppers():
    """How many workers step the refined probe themselves (``daskptycho.schedule.probe_steppers``,
    :func:`~daskptycho.schedule.passes.gd_iteration`): the halves of the probe-gradient sum go
    to each of them, and every other worker gets the stepped probe down a binary tree."""
    k = config.get("schedule.probe_steppers", PROBE_STEPPERS)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise OptionsError("schedule.probe_steppers", f"is {k!r}; use an integer >= 1 (daskptycho.yaml or "
                           "DASK_DASKPTYCHO__SCHEDULE__PROBE_STEPPERS)")
    return k


def block_iterations():
    """The most iterations of one peer block (``daskptycho.schedule.block_iterations``)."""
    k = config.get("schedule.block_iterations", 16)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise OptionsError("schedule.block_iterations", f"is {k!r}; use an integer >= 1 (daskptycho.yaml or "
                           "DASK_DASKPTYCHO__SCHEDULE__BLOCK_ITERATIONS)")
    return k


def block_end(start, iterations, block, minibatch_iterations=0, checkpoint_every=None):
    """One past the last iteration of the peer block that starts at iteration ``start``.

    A block holds up to ``block`` iterations and never reaches past the last iteration, a
    checkpoint (every ``checkpoint_every`` iterations) or the switch from minibatches to
    full batch (after ``minibatch_iterations``): each block is then of one kind, so the
    run's time per iteration of either kind can be read off the blocks' ends, and a
    minibatch block and a full-batch one are two shapes the run fuses once each. Where
    fewer than ``block // 2`` iterations would be left before such a limit, the block
    takes them too (up to 1.5 ``block``): a short block pays a block's fixed cost (the
    scheduler's round trip between stages, a shape to build) for few iterations.

    Parameters
    ----------
    start, iterations, block : int
    minibatch_iterations : int, the first iterations that run in minibatches (0: none)
    checkpoint_every : int or None

    Returns
    -------
    int, ``start < end <= iterations``
    """
    limit = iterations
    if checkpoint_every:
        limit = min(limit, (start // checkpoint_every + 1) * checkpoint_every)
    if start < minibatch_iterations:
        limit = min(limit, minibatch_iterations)
    end = min(limit, start + block)
    return limit if limit - end < block // 2 else end


def block_ends(iterations, block, minibatch_iterations=0, checkpoint_every=None):
    """The last iteration of each peer block of a run from iteration 0 (:func:`block_end`),
    in order: where a block's costs arrive together."""
    ends, start = [], 0
    while start < iterations:
        start = block_end(start, iterations, block, minibatch_iterations, checkpoint_every)
        ends.append(start - 1)
    return ends


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


def probe_homes(tiling, workers):
    """``{tile: home tile}`` for :func:`~daskptycho.schedule.passes.gd_iteration`: the
    tiles of the first tile's worker read the probe stepped on the first tile, every
    other worker's tiles the copy stepped on that worker's first tile.

    Parameters
    ----------
    tiling : Tiling
    workers : dict ``{tile: worker address}``
    """
    first = {}
    for t in tiling:
        first.setdefault(workers[t.key], t.key)
    root = tiling.tiles[0].key
    return {t.key: root if workers[t.key] == workers[root] else first[workers[t.key]] for t in tiling}


def corrects_positions(problem: Problem):
    """Whether the run refines the scan positions (gd's ``position_correction``)."""
    return bool(getattr(problem.options, "position_correction", False))


def tiling_for(problem: Problem):
    """The tile grid of a run: cores over the scanned field, halos from :func:`halo_for`.

    With position correction every halo (``"window"``'s too) grows by
    ``ceil(position_max_shift_px) + 1`` pixels
    (:func:`~daskptycho.physics.positions.position_margin_px`), as the object grid does:
    a position keeps its tile wherever it moves, and the part of its window the halo held
    before it moved stays inside the tile's extended region (window pixels beyond it are
    the patch's edge values, as for any window reaching past a probe halo)."""
    o = problem.options
    halo = halo_for(problem)
    if corrects_positions(problem):
        ny, nx = problem.window
        need = (max(ny // 2, ny - ny // 2 - 1), max(nx // 2, nx - nx // 2 - 1)) if halo is None else halo
        m = position_margin_px(o.position_max_shift_px)
        halo = (need[0] + m, need[1] + m)
    return make_tiling(problem.grid, problem.corners, problem.window, o.tiles, halo, clip_windows=True)


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
    corrections = {}
    if corrects_positions(problem):
        # each tile's own positions (the store's, grid pixel coordinates) and its region's origin
        start = problem.grid.pixel_coordinates(problem.positions_m).astype(np.float64)
        corrections = dict(origins={k: (int(ext[0]), int(ext[2])) for k, (_, ext) in tiles.items()},
                           position_start={k: start[pos] for k, (pos, _) in tiles.items()},
                           position_max_shift_px=float(o.position_max_shift_px))
    # hve's minibatches are the baseline's independent tile runs, taken only when asked for
    local_batch = None if (o.engine == "hve" and o.batch_size == "auto") else o.batch_size
    return tt.TileContext(
        kernel=problem.kernel, mask=problem.mask, window=problem.window, corners=rel, cost=o.cost,
        working_set=(o.working_set_mib, o.working_set_fraction), step=o.step, probe_step=o.probe_step, regularization=o.regularization,
        eps_per_position=problem.eps_object(1), device=o.device, local_batch=local_batch,
        hve_minibatch=o.engine == "hve" and local_batch is not None, amplitude_max=o.amplitude_max(), counted=counted, pads=pads or None, **corrections,
    )


class TiledRun(PinnedRun):
    """A run over tiles pinned to workers (gd, hve): each tile holds its extended patch
    of the object and its own patterns; the probe is one small future.

    Parameters
    ----------
    tiling : :class:`~daskptycho.tiling.Tiling`
    specs : dict ``{(r, c): (scan indices, extended region)}``
    """

    #: whether :meth:`build_from` takes the probe as ``{tile: key}`` (each tile's copy)
    per_tile_probes = False

    def __init__(self, drv, problem, source, progress, tiling, specs):
        self.tiling, self.specs = tiling, specs
        self.units = {k: pos for k, (pos, _) in specs.items()}
        self.live_grid = (tiling.rows, tiling.cols)
        # round numbers per iteration: the most rounds any iteration has (gd: the first's)
        self.tile_positions = max(len(pos) for pos, _ in specs.values())
        o = problem.options
        self.live_rounds = max(o.rounds_at(0, self.tile_positions), o.rounds_at(o.iterations - 1, self.tile_positions)) \
            if o.engine == "gd" else 1
        self.cores = {t.key: _local_core(specs[t.key][1], t.core) for t in tiling}
        self.origins = {t.key: (t.core[0], t.core[2]) for t in tiling}
        self.states, self.probe, self.ctx = {}, None, None
        # with peer exchange: each tile's copy of the probe after the last block ({tile: Ref}
        # in its worker's stage result) and the placement it was made under, so that a block
        # starts from its own worker's copy instead of fetching the root's from another worker
        self.probes, self._probes_placement = None, None
        # with position correction: each tile's estimates of the positions it owns (float64
        # (J_t, 2), grid pixel coordinates), a value on its worker threaded through the graph
        # like its state; never gathered before the end of the run
        self.corrects, self.positions = corrects_positions(problem), {}
        self._ahead, self.exchange, self._blocks, self._block_last = {}, "scheduler", {}, None
        # the last iteration of each block of several iterations run (peer exchange): a
        # block's costs reach the client together
        self.peer_block_ends = set()
        super().__init__(drv, problem, source, progress)

    def build_from(self, it, refine, states, probe, **positions):
        """The :class:`~daskptycho.schedule.graph.IterationGraph` of iteration ``it`` from
        the tiles' ``states`` and the ``probe`` (futures, keys or
        :class:`~daskptycho.schedule.fuse.Input` objects); with position correction also
        the keywords ``positions`` (each tile's, like ``states``) and ``refine_positions``
        (:meth:`position_mode`); ``number``: the iteration number the tasks compute with
        (``it``, or a task giving it in a rebound block)."""
        raise NotImplementedError

    def block_kind(self, block):
        """What else than its length, probe and position refinement sets the graph of a
        block's iterations (part of the shape a rebound block must share): nothing here."""
        return ()

    def position_mode(self, it):
        """What iteration ``it`` does with the positions: 0 keeps them, 1 refines them, 2
        searches the whole-pixel windows first and refines (the first refinement), as
        engine ml (:func:`~daskptycho.tasks.ml.refines_positions`)."""
        o = self.problem.options
        if not refines_positions(o, it):
            return 0
        return 2 if it == o.position_correction_start else 1

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
        self.probes = None
        with self.drv.span("load"):
            for key, (_, ext) in self.specs.items():
                w = self.workers[key]
                if meta is None:
                    self.states[key] = self.drv.submit_pinned(tt.initial_patch, o.slices, ext, o.device, self.problem.start_patch(ext),
                                                              worker=w, key=self.key("init", *key))
                else:  # each tile reads its own patch: the object never passes through the client
                    self.states[key] = self.drv.submit_pinned(read_array, meta["group"], _tile_name(key), None, o.device, worker=w,
                                                              key=self.key("restore", *key))
            self.positions = {}
            for key in self.specs if self.corrects else ():
                # each tile makes (or reads) its own positions: none pass through the client
                w = self.workers[key]
                if meta is None:
                    self.positions[key] = self.drv.submit_pinned(tt.start_positions, self.ctx, key, worker=w,
                                                                 key=self.key("init-positions", *key))
                else:
                    self.positions[key] = self.drv.submit_pinned(read_array, meta["group"], _positions_name(key), None, "cpu", worker=w,
                                                                 key=self.key("restore-positions", *key))

    def block_of(self, it):
        """The iterations submitted together from ``it``: with peer exchange a block of
        :func:`block_end` (up to ``daskptycho.schedule.block_iterations``, fused into one
        stage per worker, their costs coming back together); otherwise ``it`` alone."""
        o = self.problem.options
        if self.exchange != "peer":
            return [it]
        return list(range(it, block_end(it, o.iterations, block_iterations(), self.minibatch_iterations(), o.checkpoint_every)))

    def minibatch_iterations(self):
        """The first iterations that run in minibatches, where a block ends (:func:`block_end`):
        none here."""
        return 0

    def step(self, it):
        ahead = self._ahead.pop(it, None)
        if ahead is not None:  # submitted with an earlier iteration's block
            return ahead
        block = self.block_of(it)
        refine, moves = self._refinements(block)
        if self.exchange == "peer" and len(set(self.workers.values())) > 1:
            return self._peer_step(block, refine, moves)
        # the block's iterations as one graph: each iteration's graph reads the previous one's keys
        g, out = self._block_graph(block, refine, self.states, self.probe, self.positions if self.corrects else None, moves)
        wanted = out["wanted"]
        if not fuse_for(self.workers):
            fut = self.drv.submit_graph(g, self.workers, wanted)
            got = {k: fut[k] for k in wanted}
        else:  # a few tasks per worker, however many tiles it holds (schedule/fuse.py)
            fused, where = fuse_by_worker(g, it, self.workers, wanted, external=self.drv.is_future)
            got = self._submit_fused(fused, where)
        return self._took(block, out, got)

    def _refinements(self, block):
        """Per iteration of ``block``: whether it refines the probe, and what it does with
        the positions (:meth:`position_mode`; None without position correction)."""
        o = self.problem.options
        refine = tuple(o.refine_probe and i >= o.probe_refine_start for i in block)
        moves = tuple(self.position_mode(i) for i in block) if self.corrects else None
        return refine, moves

    def _block_graph(self, block, refine, states, probe, positions=None, moves=None, template=False):
        """The tile graph of ``block``'s iterations (each reading the previous one's keys)
        from ``states`` and ``probe`` (and with position correction each tile's
        ``positions``, ``moves`` saying what each iteration does with them), and what comes
        out of it: ``states`` ({tile: key}), ``costs`` ({iteration: [keys]}), ``probe``
        (key, or None without refinement), ``positions`` ({tile: key} or None) and
        ``wanted`` (all of those). ``template``: the block is built once and rebound
        (:meth:`_peer_step`), so the iteration numbers the tasks compute with are the
        block's ``Input("iteration")`` plus their place in it."""
        g = IterationGraph(tag=self.tag)
        costs, new_probe = {}, None
        for n, (i, r) in enumerate(zip(block, refine)):
            extra = {} if positions is None else {"positions": positions, "refine_positions": moves[n]}
            number = (operator.add, Input("iteration"), n) if template else i
            gi = self.build_from(i, r, states, probe, number=number, **extra)
            g.tasks.update(gi.tasks)
            g.placement.update(gi.placement)
            costs[i] = gi.outputs["costs"]
            states = gi.outputs["states"]
            if positions is not None:
                positions = gi.outputs["positions"]
            if r:
                new_probe = gi.outputs["probe"]
            # each worker's tiles go on reading their worker's copy of the probe
            probe = gi.outputs.get("probes", probe)
        wanted = [*states.values(), *(c for i in block for c in costs[i])] + ([new_probe] if new_probe is not None else [])
        wanted += list(positions.values()) if positions is not None else []
        return g, {"states": states, "costs": costs, "probe": new_probe, "probes": probe, "positions": positions,
                   "wanted": wanted}

    def _peer_step(self, block, refine, moves=None):
        """Submit a block with peer exchange. Its fused graph is built once per shape (the
        number of iterations, where the probe is refined, what the positions do and the
        pass rounds) and bound again to each later block's inputs
        (:func:`~daskptycho.schedule.fuse.rebind`): a run's blocks differ only in their
        keys' numbers, inputs and message channel. The stages' bodies are kept on their
        workers, so a block's graph is a few small tasks per worker whatever the number of
        tiles.

        The first block builds every shape the rest of the run will need (the blocks are
        known from the start, :meth:`block_of`), before any stage runs: a shape built while
        the workers compute would take a core from one of them, and through the rounds'
        barriers hold up the others too.
        """
        it = block[0]
        if not self._blocks:
            start = it
            while start < self.problem.options.iterations:
                later = self.block_of(start)
                self._block_template(later, *self._refinements(later))
                start = later[-1] + 1
        first, fused, where, out, held = self._block_template(block, refine, moves)
        inputs = {("state", k): v for k, v in self.states.items()}
        # each tile reads its own worker's copy of the probe where the last block left one
        # (the same bits on every worker: each stepped its copy from the same sums), else
        # the one probe; a block then waits for no other worker's result to start
        if self.per_tile_probes:
            own = self.probes if self._probes_placement == self.workers else None
            inputs.update({("probe", k): (own or {}).get(k, self.probe) for k in self.states})
        else:
            inputs["probe"] = self.probe
        inputs["iteration"] = it
        inputs.update({("positions", k): v for k, v in self.positions.items()})
        fused, where = rebind(fused, where, (it - first) * self.live_rounds, inputs, f"{self.tag}|{it}", bodies=held)
        got = self._submit_fused(fused, where)
        return self._took(block, {**out, "costs": dict(zip(block, out["costs"]))}, got, indexed=True)

    def _block_template(self, block, refine, moves):
        """The fused graph of ``block``'s shape, built (and its stages' bodies sent to their
        workers) the first time the shape is asked for: ``(first iteration it was built
        at, fused graph, where its results are, its outputs, the bodies' futures)``."""
        shape = (len(block), refine, moves, self.block_kind(block))
        if shape in self._blocks:
            return self._blocks[shape]
        it, rounds = block[0], self.live_rounds
        positions = {k: Input(("positions", k)) for k in self.positions} if moves is not None else None
        probe_in = {k: Input(("probe", k)) for k in self.states} if self.per_tile_probes else Input("probe")
        g, out = self._block_graph(block, refine, {k: Input(("state", k)) for k in self.states}, probe_in, positions,
                                   moves, template=True)
        if self.per_tile_probes and any(refine):  # the copies the next block starts from come out of the stages too
            out["wanted"] += [v for v in dict.fromkeys(out["probes"].values()) if v not in out["wanted"]]
        else:
            out["probes"] = None
        fused, where = fuse_by_worker(g, it * rounds, self.workers, out["wanted"],
                                      external=lambda x: isinstance(x, Input) or self.drv.is_future(x),
                                      channel=f"{self.tag}|{it}",
                                      peer_timeout_s=float(config.get("schedule.peer_timeout_s", 300)))
        # by position in the block: (key, index) in the block's one cost task
        out["costs"] = one_cost_task(fused, where, [out["costs"][i] for i in block], it * rounds)
        # the stages' bodies (every tile's tasks) go to their workers once and stay there
        bodies = stage_bodies(fused)
        held = self.drv.submit_graph(bodies, self.workers, list(bodies.tasks))
        held = {("stage", *k[1:]): f for k, f in held.items()}
        self._blocks[shape] = (it, fused, where, out, held)
        return self._blocks[shape]

    def _submit_fused(self, fused, where):
        need = list(dict.fromkeys(w.source if isinstance(w, Ref) else w for w in where.values()))
        fut = self.drv.submit_graph(fused, self.workers, need)
        return {k: Ref(fut[w.source], w.name, w.tile) if isinstance(w, Ref) else fut[w] for k, w in where.items()}

    def _took(self, block, out, got, indexed=False):
        """Keep a submitted block's results: the tiles' states, the probe, and a
        :class:`Step` per iteration (the later ones handed out as the run asks for them).
        ``indexed`` (a peer block): each iteration's costs are ``(key, index)`` pairs, places
        in the block's one cost task (:func:`~daskptycho.schedule.fuse.one_cost_task`)."""
        self._block_last = block[-1]
        if indexed or len(block) > 1:  # its costs come back together (one worker: one fused graph)
            self.peer_block_ends.add(block[-1])
        self.states = {k: got[v] for k, v in out["states"].items()}
        if out.get("positions") is not None:
            self.positions = {k: got[v] for k, v in out["positions"].items()}
        if out["probe"] is not None:
            self.probe = got[out["probe"]]
            if out.get("probes") is not None and all(v in got for v in out["probes"].values()):
                self.probes = {k: got[v] for k, v in out["probes"].items()}
                self._probes_placement = dict(self.workers)
            else:  # a block without the copies: the next one starts from the probe
                self.probes = None
        costs = out["costs"]
        # a block's later iterations are reported as they come; keep them all in flight
        self.lookahead = max(type(self).lookahead, len(block))
        if indexed:
            steps = {i: Step(i, [got[k] for k, _ in costs[i]], cost_index=[n for _, n in costs[i]]) for i in block}
        else:
            steps = {i: Step(i, [got[k] for k in costs[i]]) for i in block}
        self._ahead = {i: steps[i] for i in block[1:]}
        return steps[block[0]]

    def _state(self, key, kind="state"):
        """Tile ``key``'s state (``kind="positions"``: its positions) as a future (a fused
        iteration's state is a value inside its worker's stage result: taken out there, by
        a task on that worker)."""
        return self._future((self.positions if kind == "positions" else self.states)[key], kind, key)

    def _probe(self):
        """The probe as a future (refined in a fused block, it is a value inside the
        stage result of the worker that updated it: taken out there)."""
        return self._future(self.probe, "probe")

    def _future(self, value, kind, *key):
        if not isinstance(value, Ref):
            return value
        self._takes = getattr(self, "_takes", 0) + 1
        return self.drv.submit_pinned(take, value.source, value.name, worker=self.workers[value.tile],
                                      key=self.key("pick", kind, self._takes, *key))

    def _state_futures(self):
        return {k: self._state(k) for k in self.states}

    def preview(self, it):
        # the states a block hands out are its last iteration's: an image is cut there only
        # (an earlier iteration's would show a later object, and hold its report until the
        # block ends)
        if it != self._block_last or not self.live.due(it):
            return None
        # a state inside a peer stage's result is read there by the preview task itself
        states = {k: (v.source, v.name) if isinstance(v, Ref) else v for k, v in self.states.items()}
        return self.live.preview(it, states, self.workers, self.cores, self.origins)

    def checkpoint_arrays(self):
        s = self.problem.options.slices
        arrays = {_tile_name(k): ((s, ext[1] - ext[0], ext[3] - ext[2]), np.complex64) for k, (_, ext) in self.specs.items()}
        arrays["probe"] = (self.problem.probe.shape, np.complex64)
        if self.corrects:  # each tile's own positions, in the order of its patterns
            arrays.update({_positions_name(k): ((len(pos), 2), np.float64) for k, (pos, _) in self.specs.items()})
        return arrays

    def checkpoint_writes(self, path, it):
        writes = [self.drv.submit_pinned(write_array, path, _tile_name(k), self._state(k), worker=self.workers[k],
                                         key=self.key("checkpoint", it, *k)) for k in self.specs]
        writes += [self.drv.submit_pinned(write_array, path, _positions_name(k), self._state(k, "positions"), worker=self.workers[k],
                                          key=self.key("checkpoint-positions", it, *k)) for k in self.positions]
        writes.append(self.drv.client.submit(write_array, path, "probe", self._probe(), key=self.key("checkpoint-probe", it), pure=False))
        return writes, {}

    def checkpoint_attrs(self, small):
        return {"tiles": sorted(f"{r},{c}" for r, c in self.specs)}

    def finish(self):
        self.states = self._state_futures()
        cores = {t.key: self.drv.submit_pinned(tt.core_of, self.states[t.key], self.cores[t.key], worker=self.workers[t.key],
                                               key=self.key("core", *t.key)) for t in self.tiling}
        probe = self.drv.client.submit(to_host, self._probe(), key=self.key("host", "probe"), pure=False)
        positions = {k: self._state(k, "positions") for k in self.positions}
        got = self.drv.results([*cores.values(), *positions.values(), probe], self.workers)
        variables = {}
        if self.corrects:  # the tiles' refined positions, in scan order
            refined = np.full((self.problem.n_positions, 2), np.nan)
            for k, v in zip(positions, got[len(cores):len(cores) + len(positions)]):
                refined[self.units[k]] = np.asarray(v)
            variables = result_variables(self.problem, {"positions": refined})
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
        if self.peer_block_ends:
            attrs["peer_block_ends"] = json.dumps(sorted(self.peer_block_ends))
        return RunOutput(obj, np.asarray(got[-1]), self.costs, attrs, variables)

    def drop(self):
        self.states, self.probe, self.ctx, self.positions = {}, None, None, {}
        self.probes, self._probes_placement = None, None
        self._ahead, self.lookahead, self._blocks = {}, type(self).lookahead, {}


class GDRun(TiledRun):
    """Engine ``gd``: per-tile gradients, the four strip passes, per-tile updates
    (:func:`~daskptycho.schedule.passes.gd_iteration`)."""

    per_tile_probes = True

    def __init__(self, drv, problem, source, progress=None):
        tiling = tiling_for(problem)
        super().__init__(drv, problem, source, progress, tiling, {t.key: (t.positions, t.extended) for t in tiling})

    def minibatch_iterations(self):
        return self.problem.options.minibatch_iterations()

    def block_kind(self, block):
        """The pass rounds of each of the block's iterations (minibatches)."""
        return tuple(self.problem.options.rounds_at(i, self.tile_positions) for i in block)

    def build_from(self, it, refine, states, probe, positions=None, refine_positions=0, number=None):
        o = self.problem.options
        return gd_iteration(self.tiling, it, states, self.data, probe, self.ctx, rounds=o.rounds_at(it, self.tile_positions),
                            refine_probe=refine, local_updates=o.local_updates, tag=self.tag, positions=positions,
                            refine_positions=refine_positions, stride=self.live_rounds, order=(o.seed, it if number is None else number),
                            probe_homes=probe_homes(self.tiling, self.workers), probe_steppers=probe_steppers())


def _tile_name(key):
    return f"tile-{key[0]}-{key[1]}"


def _positions_name(key):
    return f"positions-{key[0]}-{key[1]}"


def _local_core(ext, core):
    return (slice(core[0] - ext[0], core[1] - ext[0]), slice(core[2] - ext[2], core[3] - ext[2]))


def run(drv, ds, problem, source, progress=None):
    """Run engine ``gd`` on the driver's cluster (the registry's signature)."""
    return problem, GDRun(drv, problem, source, progress).run()
