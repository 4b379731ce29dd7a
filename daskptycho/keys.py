"""The one table of task kinds: every task key's first element names a kind here.

A key is ``(kind, *indices, tag)``: the kind (``"grad"``, ``"vfwd-strip"`` ...), the
iteration or round and the tile or part it belongs to, and the run's tag (see
:class:`daskptycho.schedule.graph.IterationGraph`). The graph builders may only use kinds
of this table (``IterationGraph.add`` checks), and the driver (spans), the dashboard (a
tile's progress) and the drawings (colours) all read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The phases every task of a run is filed under (distributed spans ``("daskptycho", phase)``).
PHASES = ("load", "grad", "passes", "update")


@dataclass(frozen=True)
class Kind:
    """What a kind of task is.

    Attributes
    ----------
    phase : str or None
        One of :data:`PHASES`: ``load`` (patterns, initial or restored state), ``grad``
        (gradients, exit waves, a tile's own step, and the small values taken from
        them), ``passes`` (strip exchanges, halo exchanges, reductions), ``update``
        (new state, previews, checkpoint writes, final cut-outs).
    drawn_as : str
        The class whose colour the drawings give it (:data:`COLOURS`).
    progress : bool
        A tile (or part) has finished a step of its iteration when a task of this kind
        finishes: the dashboard counts these.
    """

    phase: str
    drawn_as: str = "tile"
    progress: bool = False


TASKS = {
    # loading patterns and state
    "load": Kind("load", "load"), "init": Kind("load", "load"), "restore": Kind("load", "load"),
    "crop-init": Kind("load", "load"), "views-init": Kind("load", "load"),
    "crop-restore": Kind("load", "load"), "views-restore": Kind("load", "load"),
    "dm-object-init": Kind("load", "load"), "dm-object-restore": Kind("load", "load"),
    "init-positions": Kind("load", "load"), "restore-positions": Kind("load", "load"),
    # gradients and what is taken from them
    "grad": Kind("grad", "grad"), "tile-cost": Kind("grad"), "hve-step": Kind("grad", "hve"),
    "ml-iteration": Kind("grad", "grad", progress=True),
    "positions": Kind("grad", "grad"),  # a tile refining (or keeping) its own scan positions
    "dm-views": Kind("grad", "grad"), "dm-partial": Kind("grad"), "dm-error": Kind("grad"),
    "dm-state": Kind("grad", "update", progress=True), "dm-probe-partial": Kind("grad", "probe"),
    # exchanges and reductions
    "vfwd-strip": Kind("passes", "vfwd"), "vbwd-strip": Kind("passes", "vbwd"),
    "hfwd-strip": Kind("passes", "hfwd"), "hbwd-strip": Kind("passes", "hbwd"), "buffer": Kind("passes"),
    "hve-core": Kind("passes", "hve"), "hve-paste": Kind("passes", "hve", progress=True),
    "tile-probe": Kind("passes"), "probe-sum": Kind("passes", "probe"),
    "dm-sum": Kind("passes", "cost"), "dm-probe-sum": Kind("passes", "probe"), "cost": Kind("passes", "cost"),
    "costs": Kind("passes", "cost"),  # a peer block's per-iteration costs, as one task (schedule/fuse.py)
    # new state, and what is cut or written from it
    "update": Kind("update", "update", progress=True), "probe": Kind("update", "probe"),
    "dm-object-update": Kind("update", "update"), "dm-object": Kind("update", "update"), "dm-crop": Kind("update", "update"),
    "dm-probe-update": Kind("update", "probe"), "dm-probe": Kind("update", "probe"), "dm-mixing": Kind("update", "probe"),
    "dm-summary": Kind("update"),
    "preview": Kind("update"), "core": Kind("update"), "nbytes": Kind("update"), "host": Kind("update"),
    # fused iterations (schedule/fuse.py): a worker's tasks of one stage, and one message between workers
    "stage": Kind("grad", "tile"), "pick": Kind("passes"), "stage-body": Kind("load", "load"),
    "checkpoint": Kind("update"), "checkpoint-object": Kind("update"), "checkpoint-probe": Kind("update"),
    "checkpoint-positions": Kind("update"),
}

#: Colours of the drawings' classes (:attr:`Kind.drawn_as`).
COLOURS = {
    "grad": "#2ca02c", "update": "#1f77b4", "vfwd": "#ff7f0e", "vbwd": "#d62728",
    "hfwd": "#9467bd", "hbwd": "#8c564b", "cost": "#7f7f7f", "probe": "#17becf",
    "hve": "#bcbd22", "tile": "#c7c7c7", "load": "#e377c2",
}


def kind_name(key):
    """The kind of a task key: its first element (``("vfwd-strip", 3, 0, 1, tag)`` ->
    ``"vfwd-strip"``), or for a string key its part before a trailing ``-<number>``."""
    if isinstance(key, tuple):
        return key[0] if key and isinstance(key[0], str) else ""
    name = str(key)
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


def kind_of(key):
    """The :class:`Kind` of a task key, or None for keys of no kind of this table."""
    return TASKS.get(kind_name(key))


def phase_of(key):
    """The phase (one of :data:`PHASES`) of a task key, or None."""
    k = kind_of(key)
    return k.phase if k else None
