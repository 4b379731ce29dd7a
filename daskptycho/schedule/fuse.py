"""One task per worker and stage: an iteration's graph with the scheduler's share made small.

The graph builders (:mod:`~daskptycho.schedule.passes`, :mod:`~daskptycho.schedule.hve`)
make a task per tile and exchange: clear, and what the drawings show, but with many tiles
per worker most of those tasks and hops never leave a worker. :func:`fuse_by_worker`
rewrites such a graph so that the scheduler sees one task per *stage* of each worker,
and one small task per message between workers:

* every task pinned to a worker gets a level: the highest level among the tasks it
  needs on its own worker, or one more than the highest among those it needs from
  another worker (or from an unpinned task). The tasks of one worker at one level are a
  stage: they run as one task, in the builder's order, on that worker
  (:func:`~daskptycho.tasks.stage.run_stage`), the tiles' exchanges among themselves
  inside it;
* what a stage hands to a stage of another worker, or to an unpinned task (the small
  reductions), goes out through one ``pick`` task on the sending worker that takes just
  those values (strips, costs, probe parts): no stage's other results travel;
* a later stage of the same worker takes an earlier stage's whole result, which stays
  where it is; unpinned tasks stay as they are.

So an iteration has a few tasks per worker (its stages and its messages) however many
tiles the worker holds, the dependencies between workers are those of the tile graph
(the passes still pipeline across directions), and every tile function runs on the same
inputs in the same order: results are bit for bit the tile graph's.

Values the engine keeps from a fused iteration (each tile's new state) are :class:`Ref`
objects: the stage's result and the name of the value in it. The next iteration's graph
takes them as inputs like any other; outside a graph, the engine turns one into a value
where it lies with a ``pick`` task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dask.core import get_dependencies

from ..tasks.peer import PeerStage, Receive, run_peer_block, run_peer_stage, stage_body
from ..tasks.stage import Slot, StageSpec, pick, run_stage
from .graph import IterationGraph

__all__ = ["Input", "Ref", "fuse_by_worker", "item", "one_cost_task", "rebind", "stage_bodies"]


@dataclass(frozen=True)
class Ref:
    """A value inside a stage's result: ``source`` (a future, or a key of the graph that
    makes it) is the stage's result (a dict), ``name`` the value's key in it, ``tile``
    the tile whose worker holds it."""

    source: object
    name: object
    tile: object


@dataclass(frozen=True)
class Input:
    """A named input of a block built once and bound again for every later block of the
    same shape (:func:`rebind`): the graph builders take it where they take a future,
    and :func:`fuse_by_worker` treats it as one (give ``external`` a test that says so)."""

    name: object


def item(d, name):
    """``d[name]`` (a task: one value out of a message)."""
    return d[name]


def _hashable(x):
    if isinstance(x, (str, int, float)) or x is None:
        return True
    if isinstance(x, (list, dict, set)) or hasattr(x, "__array__"):
        return False  # literal data: arrays are never keys
    try:
        hash(x)
        return True
    except TypeError:
        return False


def _slot_reads(arg, out):
    """The in-stage keys (``Slot(None, key)``) a rewritten task reads."""
    if isinstance(arg, Slot):
        if arg.index is None:
            out.add(arg.name)
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            _slot_reads(a, out)
    return out


def _add_pick(fused, picks, key, task, tile):
    """A pick task for a :class:`Ref` held by another worker (one per Ref and iteration)."""
    ref = task[1], task[2][0]
    if ("ref", ref) not in picks:
        picks[("ref", ref)] = fused.add(key + (len(picks),), task, tile)
    return picks[("ref", ref)]


def _rewrite_unpinned(arg, k, stage_of, message):
    """Task ``k`` (not in a stage) with every value it reads from a stage taken out of
    that stage's message to it (``message(stage, k)``). A module function because a closure
    that calls itself is a reference cycle: it would keep the fused graph, and the futures
    it holds (a run's patterns), alive until Python's next cyclic garbage collection."""
    if isinstance(arg, tuple) and arg and callable(arg[0]):
        return (arg[0],) + tuple(_rewrite_unpinned(a, k, stage_of, message) for a in arg[1:])
    if isinstance(arg, list):
        return [_rewrite_unpinned(a, k, stage_of, message) for a in arg]
    if _hashable(arg) and arg in stage_of:
        return (item, message(stage_of[arg], k), arg)
    return arg


class _StageBuilder:
    """Rewrites the tasks of one stage: their inputs become :class:`Slot` references to
    the stage task's arguments (futures, earlier stages of the worker, messages)."""

    def __init__(self, sid, it, members, tasks, stage_of, stage_key, tile_workers, external, message, add_pick, workers, peer_msg=None):
        self.it, self.peer_msg = it, peer_msg
        self.sid, self.members, self.tasks, self.stage_of, self.stage_key = sid, members, tasks, stage_of, stage_key
        self.tile_workers, self.external, self.message, self.add_pick, self.workers = tile_workers, external, message, add_pick, workers
        self.slots, self.slot_of = [], {}

    def slot(self, arg, name):
        ident = (arg if _hashable(arg) else id(arg), name)
        if ident not in self.slot_of:
            self.slot_of[ident] = len(self.slots)
            self.slots.append(arg)
        return Slot(self.slot_of[ident], name)

    def rewrite(self, arg):
        sid = self.sid
        if isinstance(arg, tuple) and arg and callable(arg[0]):
            return (arg[0],) + tuple(self.rewrite(a) for a in arg[1:])
        if isinstance(arg, list):
            return [self.rewrite(a) for a in arg]
        if isinstance(arg, Ref):
            if self.tile_workers.get(arg.tile) == sid[0]:
                return self.slot(arg.source, arg.name)  # held by this worker: the whole result stays here
            key = self.add_pick(("pick", self.it, sid[1], self.workers.index(sid[0])), (pick, arg.source, [arg.name]), arg.tile)
            return self.slot(key, arg.name)
        if _hashable(arg) and arg in self.tasks:
            if arg in self.members:
                return Slot(None, arg)
            producer = self.stage_of.get(arg)
            if producer is None:
                return self.slot(arg, None)
            if producer[0] == sid[0]:
                return self.slot(self.stage_key[producer], arg)
            if self.peer_msg is not None:  # sent by the producing stage itself, worker to worker
                return Receive(self.peer_msg(arg))
            return self.slot(self.message(producer, sid), arg)
        if self.external(arg):
            return self.slot(arg, None)
        return arg


def fuse_by_worker(graph: IterationGraph, it, tile_workers, wanted, external, channel=None, peer_timeout_s=300.0):
    """Fuse ``graph``'s pinned tasks into one task per worker and stage (module docstring).

    With ``channel`` (peer exchange, :mod:`~daskptycho.tasks.peer`), a value a pinned
    task of another worker needs is sent by its stage straight to that worker, as message
    ``channel``/its position in the graph, instead of going out through a pick task: a
    dependency between workers then no longer starts a new stage, only one on an
    unpinned task (a reduction) does, so an iteration without reductions between its
    tiles' tasks is one stage per worker. Each stage also waits for its worker's previous
    stage, so a worker runs its stages in order.

    Parameters
    ----------
    graph : IterationGraph
        The tile graph; its arguments may hold futures (inputs from earlier iterations)
        and :class:`Ref` objects, besides its own keys and literal data.
    it : int
        The iteration (in every new key: keys of different iterations must differ).
    tile_workers : dict ``{tile: worker}``
    wanted : list of keys of ``graph`` the caller needs as results
    external : callable ``x -> bool``
        True for the objects that are results computed elsewhere (futures): they become
        arguments of the stage task, so the scheduler sees the dependency.
    channel : str, optional
        The messages' namespace for peer exchange (unique to the run's attempt and the
        iteration); None: every message between workers is a task.
    peer_timeout_s : float
        How long a peer stage waits for a message before it fails.

    Returns
    -------
    fused : IterationGraph
        Stage tasks ``("stage", it, level, w)``, message tasks ``("pick", it, level, w, i)`` (``w``:
        the worker's index in ``tile_workers``' order) and the graph's unpinned tasks; each
        stage and pick placed on one of its worker's tiles.
    results : dict ``{wanted key: Ref or key}``
        Where each wanted value is in ``fused``: its own key (unpinned tasks), or a
        :class:`Ref` to the stage holding it.
    """
    tasks = graph.tasks
    order = list(tasks)  # the builders add a task after everything it needs
    position = {k: i for i, k in enumerate(order)}
    deps = {k: set(get_dependencies(tasks, k)) for k in order}
    worker = {k: tile_workers[graph.placement[k]] for k in order if k in graph.placement}
    peer = channel is not None
    level = {}
    for k in order:
        lv = 0
        for d in deps[k]:
            # a new stage after a value from another worker (a task's result) or from an unpinned
            # task; with peer exchange only after an unpinned task's
            same = k in worker and (worker.get(d) == worker[k] or (peer and d in worker))
            lv = max(lv, level[d] + (1 if k in worker and not same else 0))
        level[k] = lv
    stage_of = {k: (worker[k], level[k]) for k in order if k in worker}
    stages = {}
    for k in order:
        if k in stage_of:
            stages.setdefault(stage_of[k], []).append(k)
    workers = list(dict.fromkeys(tile_workers.values()))
    sequence = sorted(stages, key=lambda s: (s[1], workers.index(s[0])))
    home = {sid: graph.placement[members[0]] for sid, members in stages.items()}
    fused = IterationGraph(tag=graph.tag)
    stage_key = {}

    # who needs which value of each stage: a later stage of its own worker, another worker (all of
    # that worker's stages together: one message, fetched once by the worker) or an unpinned task
    # one message per producing stage carries what all the unpinned tasks need of it (the
    # costs and probe parts of every tile of the worker, of every iteration the stage runs)
    unpinned = ("unpinned",)
    needed_by, sends = {}, {}
    for k in order:
        consumer = stage_of.get(k, unpinned)
        for d in deps[k]:
            if peer and d in stage_of and k in stage_of and worker[d] != worker[k]:
                sends.setdefault(stage_of[d], {}).setdefault(d, set()).add(worker[k])
                continue
            if d in stage_of and stage_of[d] != consumer:
                if consumer in stages and consumer[0] != stage_of[d][0]:
                    consumer = ("worker", consumer[0])
                needed_by.setdefault(stage_of[d], {}).setdefault(consumer, set()).add(d)
                consumer = stage_of.get(k, unpinned)
    exports = {sid: set() for sid in stages}
    for sid, consumers in needed_by.items():
        for members in consumers.values():
            exports[sid] |= members
    for w in wanted:
        if w in stage_of:
            exports[stage_of[w]].add(w)

    picks = {}

    def message(producer, consumer):
        """The pick task carrying what ``consumer`` needs of ``producer``: one per producing
        stage and receiving worker (or unpinned task)."""
        if consumer in stages:
            consumer = ("worker", consumer[0])
        elif consumer[0] != "worker":
            consumer = unpinned
        key = picks.get((producer, consumer))
        if key is None:
            names = sorted(needed_by[producer][consumer], key=position.get)
            key = fused.add(("pick", it, producer[1], workers.index(producer[0]), len(picks)),
                            (pick, stage_key[producer], names), home[producer])
            picks[(producer, consumer)] = key
        return key

    previous = {}
    for sid in sequence:
        stage = _StageBuilder(sid, it, set(stages[sid]), tasks, stage_of, stage_key, tile_workers, external, message,
                              lambda key, task, tile: _add_pick(fused, picks, key, task, tile), workers,
                              peer_msg=position.get if peer else None)
        body = [(k, stage.rewrite(tasks[k])) for k in stages[sid]]
        # drop each value after its last reader in the stage, unless it leaves the stage (a peer
        # stage runs its tasks out of order and finds the last reader as it goes)
        release = [[] for _ in body]
        if not peer:
            last = {}
            for i, (_, task) in enumerate(body):
                for r in _slot_reads(task, set()):
                    last[r] = i
            for i, (k, _) in enumerate(body):
                if k not in exports[sid]:
                    release[last.get(k, i)].append(k)
        spec = StageSpec(tuple(body), tuple(sorted(exports[sid], key=position.get)), tuple(tuple(r) for r in release))
        key = ("stage", it, sid[1], workers.index(sid[0]))
        if not peer:
            stage_key[sid] = fused.add(key, (run_stage, spec, *stage.slots), home[sid])
            continue
        out = tuple((k, position[k], tuple(sorted(to))) for k, to in sorted(sends.get(sid, {}).items(), key=lambda kv: position[kv[0]]))
        sources = {worker[d] for k in stages[sid] for d in deps[k] if d in worker and worker[d] != sid[0]}
        peers = tuple(sorted(sources | {a for _, _, to in out for a in to}))
        args = list(stage.slots)
        if sid[0] in previous:  # the worker's stages run in order (an unused argument: the dependency)
            args.append(stage_key[previous[sid[0]]])
        stage_key[sid] = fused.add(key, (run_peer_stage, PeerStage(spec, str(channel), out, peers, float(peer_timeout_s)), *args), home[sid])
        previous[sid[0]] = sid

    for k in order:
        if k not in stage_of:
            fused.tasks[k] = _rewrite_unpinned(tasks[k], k, stage_of, message)

    results = {w: Ref(stage_key[stage_of[w]], w, home[stage_of[w]]) if w in stage_of else w for w in wanted}
    fused.outputs = dict(graph.outputs)
    return fused, results


def one_cost_task(fused, results, costs, it):
    """Replace the per-iteration cost reductions of a fused block by one task.

    A peer block's stages finish together, so its iterations' costs are ready together:
    one task computing them all, fetched once, spares the scheduler a task per iteration
    and the client a fetch per iteration. Each cost is the same expression, summed in the
    same order, as its own task was: the values are the same, bit for bit.

    Parameters
    ----------
    fused, results : as :func:`fuse_by_worker` returns them (changed in place)
    costs : list of lists of keys
        Each iteration's cost keys (unpinned tasks of ``fused``), in the block's order.
    it : int
        The number of the new key ``("costs", it)``.

    Returns
    -------
    list of lists of ``(key, index)``: where each iteration's costs are, the new task's
    key and the cost's place in its result (a list).
    """
    flat = [k for ks in costs for k in ks]
    if not all(k in fused.tasks and k not in fused.placement and results.get(k) == k for k in flat):
        raise ValueError("the costs must be unpinned tasks of the fused graph")
    key = fused.add(("costs", it), (list, [fused.tasks.pop(k) for k in flat]))
    for k in flat:
        results.pop(k)
    results[key] = key
    place = {k: i for i, k in enumerate(flat)}
    return [[(key, place[k]) for k in ks] for ks in costs]


def stage_bodies(fused):
    """Tasks that keep each peer stage's body on its worker, ``("stage-body", *stage key
    indices)`` placed like the stage: submitted once and handed to :func:`rebind` as
    ``bodies``, a block's graph then carries no tile's task."""
    bodies = IterationGraph(tag=None)
    for k, task in fused.tasks.items():
        if k[0] == "stage" and task[0] is run_peer_stage:
            bodies.tasks[("stage-body", *k[1:])] = (stage_body, task[1])
            bodies.placement[("stage-body", *k[1:])] = fused.placement[k]
    return bodies


def _bind(x, inputs, keys, channel):
    """``x`` (a task or argument of a block's graph) for another block (see :func:`rebind`).
    A module function because a closure that calls itself is a reference cycle: it would
    keep a finished run's inputs (its tiles' states) alive until Python's next cyclic
    garbage collection."""
    if isinstance(x, Input):
        v = inputs[x.name]
        return (item, v.source, v.name) if isinstance(v, Ref) else v
    if isinstance(x, PeerStage):
        return dataclasses.replace(x, channel=str(channel))
    if isinstance(x, tuple) and x and callable(x[0]):
        return (x[0],) + tuple(_bind(a, inputs, keys, channel) for a in x[1:])
    if isinstance(x, list):
        return [_bind(a, inputs, keys, channel) for a in x]
    if _hashable(x) and x in keys:
        return keys[x]
    return x


def rebind(fused, results, shift, inputs, channel, bodies=None):
    """``fused`` and ``results`` of :func:`fuse_by_worker`, made again for another block of
    the same shape without building or fusing anything: every key's number moves by
    ``shift``, each :class:`Input` becomes its value in ``inputs``, and the peer stages get
    ``channel``.

    The stages' bodies (their tasks, exports and messages) are shared, not copied: inside a
    stage, values are named by the keys of the block the graph was built for, and the
    engine reads them by those names. Only the tasks the scheduler sees are made anew, so
    the client's work per block grows with the number of stages and reductions, not tiles.

    Parameters
    ----------
    fused : IterationGraph
        Built with :class:`Input` objects for the block's inputs.
    results : dict ``{wanted key: Ref or key}``
    shift : int
        Added to the number after the kind in every key of ``fused`` (the keys
        :func:`fuse_by_worker` makes and those of the graph builders are
        ``(kind, number, ...)``, the number counting iterations or rounds).
    inputs : dict ``{Input name: value}``
        A :class:`Ref` becomes the task ``item(source, name)``: a stage result stays on its
        worker and the stage reads the one value it needs from it.
    channel : str or None
        The peer stages' message namespace for this block.
    bodies : dict, optional
        ``{stage key of fused: future}`` of the tasks of :func:`stage_bodies`: those stages
        read their body there (:func:`~daskptycho.tasks.peer.run_peer_block`) instead
        of carrying it.

    Returns
    -------
    fused, results : as :func:`fuse_by_worker` returns them, for the new block.
    """
    keys = {k: (k[0], k[1] + shift, *k[2:]) for k in fused.tasks}
    bodies = bodies or {}

    def task(k, t):
        if k in bodies:
            return (run_peer_block, bodies[k], str(channel), *(_bind(a, inputs, keys, channel) for a in t[2:]))
        return _bind(t, inputs, keys, channel)

    out = IterationGraph(tag=fused.tag)
    out.tasks = {keys[k]: task(k, t) for k, t in fused.tasks.items()}
    out.placement = {keys[k]: tile for k, tile in fused.placement.items()}
    out.outputs = dict(fused.outputs)
    moved = {w: Ref(keys.get(r.source, r.source), r.name, r.tile) if isinstance(r, Ref) else keys.get(r, r)
             for w, r in results.items()}
    return out, moved
