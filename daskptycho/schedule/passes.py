"""Gradient decomposition: one iteration as an explicit dependency graph.

The accumulated-gradient buffers of the tiles are summed over their overlaps by
four chains of point-to-point strip exchanges (Fig. 4 of the paper):

1. vertical forward: down each column, add the overlap strip of (r, c) into (r+1, c);
2. vertical backward: up each column, replace the overlap strip of (r, c) by (r+1, c)'s;
3. horizontal forward and 4. backward: the same along each row.

Where no pixel lies in more than two tiles along an axis (halos at most half a core:
the default probe-support halos on any but the smallest cores), a forward pass and its
backward pass leave each pair of neighbours with the sum of their two strips, and nothing
else: :func:`exchange_strips` then has both neighbours cut their strip at once and add the
other's, one message between them instead of two in a row. The sums are bit for bit the
passes' (floating-point addition commutes), and a row's horizontal exchange still waits
for that row's vertical one only. :func:`gd_iteration` takes it whenever it applies
(:func:`neighbour_exchange`).

Only strips travel: a strip is cut by a task on the sender's worker, from the
sender's gradient buffer with the strips it has received so far applied, and the
receiver applies it (adds it in a forward pass, pastes it in a backward one) where
its buffer is next read on its own worker: in the next strip it cuts, or in its
update (:class:`Buffer`). So each exchange is one task and one scheduler hop, and no
whole buffer is copied per pass. A row's horizontal passes depend on that row's own
vertical results only, so the bottom row can start them while upper rows are still
in their vertical backward pass (the paper's asynchronous pipelining, APPP).

Keys: ``("grad", s, r, c)``, ``("vfwd-strip", s, r, c)`` (cut on tile (r, c) for
(r + 1, c)), ``("vbwd-strip", ...)`` (for (r - 1, c)), ``("hfwd-strip", ...)`` (for
(r, c + 1)), ``("hbwd-strip", ...)`` (for (r, c - 1)), ``("update", s, r, c)``, the per-tile
scalars ``("tile-cost", s, r, c)`` and probe-gradient parts ``("tile-probe", s, r, c)``,
their reductions ``("cost", it * T)`` (one per iteration) and ``("probe-sum", s, level, i)``,
and the probe step ``("probe", s)`` (on the tile holding the sum) with its copies
``("probe", s, r, c)`` on other workers' tiles (``probe_homes``: stepped there, or relayed
by :func:`~daskptycho.tasks.tiles.relay`), where ``s = iteration * T +
round`` counts pass rounds (``s`` is the iteration when ``T = 1``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from ..tasks import tiles as tt
from .graph import IterationGraph

#: Default ``probe_steppers`` of :func:`gd_iteration` (``daskptycho.schedule.probe_steppers``):
#: the homes (the first tile's included) that step the refined probe themselves from the
#: two halves of the probe-gradient sum; the other homes receive the stepped probe down a
#: binary tree of homes. Each half then goes to at most this many workers and each home
#: sends the probe on to at most two, so a round's probe costs ``log2(workers /
#: probe_steppers)`` messages in a row, not ``workers`` messages from one worker.
PROBE_STEPPERS = 4


@dataclass(frozen=True)
class Buffer:
    """A tile's accumulated gradient buffer as the graph knows it between passes.

    Attributes
    ----------
    base : key, future or value
        The buffer its gradient task made (never changed).
    strips : tuple of keys
        The strips it has received so far, in the order they apply.
    patches : tuple of ``(op, (slice y, slice x))``
        For each strip: ``"add"`` (forward pass) or ``"replace"`` (backward pass) and
        where it goes in the tile's extended array.

    A receiving tile applies its strips where its buffer is next read, by the task
    that reads it on its own worker: the next strip it cuts
    (:func:`~daskptycho.tasks.tiles.cut_strip`) or its update. Each exchange is
    then one task (the strip, cut on the sender) and one hop, instead of a strip task
    and a task that copies the whole receiving buffer to add or paste it.
    """

    base: object
    strips: tuple = ()
    patches: tuple = ()

    def receive(self, strip, op, region):
        return Buffer(self.base, self.strips + (strip,), self.patches + ((op, region),))

    def within(self, region):
        """The same buffer as far as ``region`` (local slices) goes: only the strips that
        touch it, in order. A strip cut from ``region`` then depends on those alone, so
        a backward strip does not wait for a strip that never reaches its pixels (with a
        halo under half a core, the backward pass of a column runs in parallel)."""
        keep = [i for i, (_, where) in enumerate(self.patches) if tt.regions_overlap(where, region)]
        return Buffer(self.base, tuple(self.strips[i] for i in keep), tuple(self.patches[i] for i in keep))


def accumulate_passes(tiling, s, buffers, graph=None):
    """Add the four passes of round ``s`` to ``graph``.

    Parameters
    ----------
    tiling : Tiling
    s : int, the round
    buffers : dict ``{(r, c): key or value}``, each tile's gradient buffer
    graph : IterationGraph, optional (a new one by default)

    Returns
    -------
    graph, final : IterationGraph, ``{(r, c): Buffer}``: each tile's accumulated buffer
    (its gradient buffer and the strips to apply, see :class:`Buffer` and
    :func:`materialise`).
    """
    g = graph if graph is not None else IterationGraph()
    cur = {k: v if isinstance(v, Buffer) else Buffer(v) for k, v in buffers.items()}
    R, C = tiling.rows, tiling.cols

    def exchange(name, src, dst, op):
        ov = tiling.overlap(src, dst)
        if ov is None:  # cores always touch, so this only guards degenerate grids
            return
        b = cur[src].within(tiling[src].local(ov))
        strip = g.add((f"{name}-strip", s, *src), (tt.cut_strip, b.base, list(b.strips), b.patches, tiling[src].local(ov)), src)
        cur[dst] = cur[dst].receive(strip, op, tiling[dst].local(ov))

    for c in range(C):
        for r in range(1, R):
            exchange("vfwd", (r - 1, c), (r, c), "add")
        for r in range(R - 2, -1, -1):
            exchange("vbwd", (r + 1, c), (r, c), "replace")
    for r in range(R):
        for c in range(1, C):
            exchange("hfwd", (r, c - 1), (r, c), "add")
        for c in range(C - 2, -1, -1):
            exchange("hbwd", (r, c + 1), (r, c), "replace")
    return g, cur


def neighbour_exchange(tiling):
    """True when no pixel lies in the extended regions of more than two tiles along either
    axis (each core at least two halos long, or the grid's edge clipping them), so that
    :func:`exchange_strips` gives the four passes' sums."""
    def apart(a, mid, b):
        oa, ob = tiling.overlap(a, mid), tiling.overlap(mid, b)
        return oa is None or ob is None or not tt.regions_overlap(tiling[mid].local(oa), tiling[mid].local(ob))

    R, C = tiling.rows, tiling.cols
    return all(apart((r - 1, c), (r, c), (r + 1, c)) for r in range(1, R - 1) for c in range(C)) and \
        all(apart((r, c - 1), (r, c), (r, c + 1)) for r in range(R) for c in range(1, C - 1))


def exchange_strips(tiling, s, buffers, graph=None):
    """Add the strip exchanges of round ``s`` to ``graph`` where
    :func:`neighbour_exchange` holds: first along each column, then along each row, both
    tiles of every neighbouring pair cut their overlap strip (``vfwd``/``hfwd``: the upper
    or left tile's, ``vbwd``/``hbwd``: the other's) and each adds the other's. Every tile
    ends with the same sums, bit for bit, as after :func:`accumulate_passes`, and the
    same keys; a row's strips need that row's vertical exchange only.

    Parameters and returns as :func:`accumulate_passes`.
    """
    g = graph if graph is not None else IterationGraph()
    cur = {k: v if isinstance(v, Buffer) else Buffer(v) for k, v in buffers.items()}
    R, C = tiling.rows, tiling.cols
    directions = (("v", [((r - 1, c), (r, c)) for c in range(C) for r in range(1, R)]),
                  ("h", [((r, c - 1), (r, c)) for r in range(R) for c in range(1, C)]))
    for axis, pairs in directions:
        before = dict(cur)  # both strips of a pair are cut before either is added
        for a, b in pairs:
            ov = tiling.overlap(a, b)
            if ov is None:  # cores always touch, so this only guards degenerate grids
                continue
            for name, src, dst in ((f"{axis}fwd", a, b), (f"{axis}bwd", b, a)):
                buf = before[src].within(tiling[src].local(ov))
                strip = g.add((f"{name}-strip", s, *src), (tt.cut_strip, buf.base, list(buf.strips), buf.patches,
                                                            tiling[src].local(ov)), src)
                cur[dst] = cur[dst].receive(strip, "add", tiling[dst].local(ov))
    return g, cur


def materialise(tiling, s, final, graph):
    """Add a task per tile that builds its accumulated buffer (``("buffer", s, r, c)``,
    on the tile's worker) and return ``{(r, c): key}``; a tile that received no strip
    keeps its input. The engine never needs these: each tile's update applies its
    strips itself."""
    out = {}
    for t in tiling:
        b = final[t.key]
        out[t.key] = graph.add(("buffer", s, *t.key), (tt.apply_patches, b.base, list(b.strips), b.patches), t.key) if b.strips else b.base
    return out


def round_positions(tiling, rounds):
    """``{(r, c): [local index arrays, one per round]}``: each tile's positions
    split into ``rounds`` interleaved groups (every ``rounds``-th in acquisition order), so
    that each round's positions spread over the whole tile, as a minibatch's do."""
    return {t.key: [np.arange(k, t.positions.size, rounds) for k in range(rounds)] for t in tiling}


def gd_iteration(tiling, it, states, data, probe, context, rounds=1, refine_probe=False, local_updates=False, tag=None,
                 positions=None, refine_positions=0, stride=None, order=None, probe_homes=None,
                 probe_steppers=PROBE_STEPPERS):
    """The task graph of one gradient-decomposition iteration (pure: no client).

    Parameters
    ----------
    tiling : Tiling
    it : int
    states : dict ``{(r, c): key/future/value}``: each tile's object patch (S, h, w)
    data : dict ``{(r, c): key/future/value}``: each tile's patterns (J_t, N, N), FFT order
    probe : key/future/value, or dict ``{(r, c): key/future/value}``
        The probe (K, N, N), or each tile's copy of it: an earlier iteration's ``probes``
        output, so that each worker's tiles go on reading their worker's copy.
    context : key/future/value: a :class:`~daskptycho.tasks.tiles.TileContext`
    rounds : int
        Pass rounds of this iteration (the paper's T), each over an interleaved share of
        every tile's positions (:func:`round_positions`): minibatches when > 1.
    order : (seed, iteration), optional
        With several rounds, each tile's rounds take the interleaved shares of a random
        order of its positions drawn from ``(seed, iteration, tile)``
        (:func:`~daskptycho.tasks.tiles.round_group`), new every iteration as ``ml``'s
        minibatches are; ``iteration`` may be a task (a rebound block's). None: the shares
        of the acquisition order (:func:`round_positions`).
    stride : int, optional
        Round numbers each iteration takes (default ``rounds``; the most rounds an
        iteration of the run has): round ``rnd`` is ``s = it * stride + stride - rounds
        + rnd``, so the last round of an iteration is always ``(it + 1) * stride - 1``.
    refine_probe : bool
        Sum the probe gradient over tiles (tree reduction) and update the probe.
    probe_homes : dict ``{(r, c): (r, c)}``, optional
        Where each tile's gradient reads the refined probe from: tiles given here read
        the copy of the probe on their home tile (one per worker: the engine's
        :func:`~daskptycho.engines.gd.probe_homes`). The first ``probe_steppers``
        homes in tile order (the first tile, which holds the sum's top and whose copy is
        the iteration's ``probe``, and the next ones) step it themselves from the same
        two halves of the sum, in the same order: their tiles start the next round one
        message after the halves leave instead of two. Each further home ``i`` (0-based in
        that order) receives the stepped copy of home ``(i - probe_steppers) // 2``, a
        binary tree, so no worker sends more than a few probes per round. Every copy is
        bit for bit the same. Tiles not given read the first tile's.
    probe_steppers : int
        See ``probe_homes`` (:data:`PROBE_STEPPERS`; at least 1).
    local_updates : bool
        Update each tile after each minibatch of its own positions between passes
        (Alg. 1, lines 5-9); off: pure batch mode, exactly full-batch gradient descent.
    tag : hashable, optional
        Appended to every key (see :class:`~daskptycho.schedule.graph.IterationGraph`).
    positions : dict ``{(r, c): key/future/value}``, optional
        Position correction: each tile's estimates of the positions it owns (float64
        (J_t, 2), grid pixel coordinates). At the start of the iteration each tile
        refines them on its own patch, on its own worker (``("positions", s, r, c)``,
        :func:`~daskptycho.tasks.tiles.tile_positions`), or keeps them
        (:func:`~daskptycho.tasks.tiles.kept_positions`, so they come out of the same
        stage as the tile's state); its gradients cut their windows there. None (the
        default): the store's positions, ``context.corners``, and the graph without them.
    refine_positions : {0, 1, 2}
        0 keeps the positions, 1 refines them, 2 searches the whole-pixel windows first.

    Returns
    -------
    IterationGraph with outputs ``states`` ({tile: key}), ``probe`` (the first tile's
    key, or the input), ``probes`` ({tile: key}: the copy each tile read last), ``costs`` (a list of one key: the iteration's cost, the rounds' sums added in order),
    ``positions`` ({tile: key} or None).
    """
    g = IterationGraph(tag=tag)
    states = dict(states)
    groups = round_positions(tiling, rounds)
    root = tiling.tiles[0].key
    homes = dict(probe_homes or {})
    replicas = [t.key for t in tiling if t.key != root and t.key in set(homes.values())]
    # the probe each tile's gradient reads
    probe_at = dict(probe) if isinstance(probe, dict) else {t.key: probe for t in tiling}
    strips = exchange_strips if neighbour_exchange(tiling) else accumulate_passes
    costs = []
    where = ()
    stride = rounds if stride is None else stride
    first = it * stride + stride - rounds
    if positions is not None:
        s = first
        positions = {t.key: g.add(("positions", s, *t.key), (
            tt.tile_positions, states[t.key], data[t.key], positions[t.key], probe_at[t.key], context, t.key,
            refine_positions == 2)
            if refine_positions else (tt.kept_positions, positions[t.key]), t.key) for t in tiling}
    for rnd in range(rounds):
        s = first + rnd
        n_round = int(sum(groups[t.key][rnd].size for t in tiling))
        grads = {}
        for t in tiling:
            if positions is not None:
                where = (positions[t.key],)
            local = groups[t.key][rnd]
            if order is not None and rounds > 1:
                local = (tt.round_group, t.positions.size, rounds, rnd, t.key, *order)
            grads[t.key] = g.add(("grad", s, *t.key), (
                tt.tile_gradient, states[t.key], data[t.key], local, probe_at[t.key], context, t.key,
                refine_probe, local_updates, *where), t.key)
        _, final = strips(tiling, s, grads, g)
        tile_costs = [g.add(("tile-cost", s, *t.key), (operator.getitem, grads[t.key], "cost"), t.key) for t in tiling]
        costs.append((sum, tile_costs))
        new_probe = probe_at
        if refine_probe:
            parts = [g.add(("tile-probe", s, *t.key), (tt.probe_part, grads[t.key]), t.key) for t in tiling]
            total = g.tree_sum("probe-sum", s, parts, tt.add_parts, tiles=[t.key for t in tiling])
            # on the tile holding the total (with peer exchange the new probe then goes worker
            # to worker: a round needs no task of the scheduler's between its stages), and a
            # copy from the same two halves on each other home
            new_probe = {root: g.add(("probe", s), (tt.probe_update, probe_at[root], total, context), root)}
            tree = [root] + replicas
            for i, home in enumerate(tree[1:], 1):
                if i < probe_steppers:
                    summed = g.add(("probe-sum", s, total[2], i), g.tasks[total], home) if total[0] == "probe-sum" else total
                    new_probe[home] = g.add(("probe", s, *home), (tt.probe_update, probe_at[home], summed, context), home)
                else:  # relayed down the tree of homes from a home that has it
                    parent = tree[(i - probe_steppers) // 2]
                    new_probe[home] = g.add(("probe", s, *home), (tt.relay, new_probe[parent]), home)
            new_probe = {t.key: new_probe[homes.get(t.key, root)] for t in tiling}
        for t in tiling:
            # the update needs the gradient task's own result only for its locally
            # stepped tile; otherwise depending on it would keep a whole buffer alive
            local = (operator.getitem, grads[t.key], "local_object") if local_updates else None
            b = final[t.key]
            states[t.key] = g.add(("update", s, *t.key), (
                tt.tile_update, states[t.key], local, b.base, list(b.strips), b.patches, context, n_round), t.key)
        probe_at = new_probe
    probe = probe_at[root]
    # one task for the iteration's cost, the rounds' sums added in order (as the run adds
    # the costs it is given): the scheduler and the client handle one number per iteration
    g.outputs.update(states=states, probe=probe, probes=probe_at, costs=[g.add(("cost", first), (sum, costs))])
    if positions is not None:
        g.outputs["positions"] = positions
    return g
