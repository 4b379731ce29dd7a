"""The one run skeleton every engine shares: state pinned to workers, iterated, saved,
finished, and recovered after a lost worker.

A run's state lives in *units* (the tiles of gd and hve, the parts of dm, the one unit
of ml), each pinned to a worker with its own patterns. :class:`PinnedRun` holds what is
common: placement, the run's tag (keys unique to a run and an attempt), loading the
patterns, the loop that keeps ``lookahead`` iterations in flight and reports each
iteration's cost (live page, progress callback), checkpoints (begun while the
iteration runs, committed once its cost is in), the final memory report, and the
recovery loop. An engine is a subclass that says what its units are and fills in
:meth:`~PinnedRun.begin`, :meth:`~PinnedRun.step`, :meth:`~PinnedRun.finish` and the
checkpoint hooks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass, field

import numpy as np

from .. import config
from ..errors import RecoveryError, WorkerLost
from ..io.checkpoint import Checkpoint
from ..tasks.tiles import load_tile_patterns
from .live import LiveView
from .memory import unit_bytes


@dataclass
class Step:
    """One iteration in flight: its cost futures (summed in order), other small results
    the engine records (``extras``, ``{name: future}``) and its live image, if any.
    ``cost_index``: for each cost future, the place of the cost in its result (a list of
    a block's costs, fetched once for all its iterations), or None: the result itself."""

    it: int
    costs: list
    extras: dict = field(default_factory=dict)
    image: dict | None = None
    cost_index: list | None = None


@dataclass
class RunOutput:
    """What a run gives back: the final object (S or L, H, W) and probe (K, N, N) on the
    host, the costs, and what the result records besides (``attrs``, ``variables``;
    ``cost_name``, the cost's long name where it is not the options' cost)."""

    object: np.ndarray
    probe: np.ndarray
    costs: list
    attrs: dict = field(default_factory=dict)
    variables: dict = field(default_factory=dict)
    cost_name: str | None = None


class PinnedRun:
    """The lifecycle of a run whose state lives in units pinned to workers.

    Parameters
    ----------
    drv : :class:`~daskptycho.engines.driver.Driver`
    problem : :class:`~daskptycho.engines.problem.Problem`
    source : str or Future
        The dataset store's path (each unit's worker reads its own patterns) or a
        future of all patterns (a dataset that was never written).
    progress : callable(iteration, cost), optional

    Subclasses set :attr:`units` (``{unit: scan indices}``) before calling this
    constructor, and :attr:`unit_label` / :attr:`lookahead` as class attributes.
    """

    #: what units are called in the log and the recovery record ("tiles" -> "tiles_moved")
    unit_label = "tiles"
    #: iterations submitted ahead of the one whose cost is reported
    lookahead = 1
    #: the next iteration overwrites the state a checkpoint writes: wait for the writes first
    writes_before_next = False
    #: the grid of units the live page draws, and update tasks per unit per iteration
    live_grid = (1, 1)
    live_rounds = 1
    #: an iteration's cost comes only once every unit has finished it (the live page's tile progress)
    tiles_done_with_cost = False

    units: dict

    def __init__(self, drv, problem, source, progress=None):
        o = problem.options
        self.drv, self.problem, self.source, self.progress = drv, problem, source, progress
        self.ck = Checkpoint(o.checkpoint) if o.checkpoint else None
        self.meta = resume_meta(problem)
        self.resumed_from = int(self.meta["completed"]) if self.meta else None
        self.max_recoveries = int(config.get("recovery.max_recoveries", 3))
        self.workers = drv.place(list(self.units))
        self.n_workers = len(drv.worker_addresses)
        self.data, self.recoveries = {}, []
        self.run_id = uuid.uuid4().hex[:8]
        self.live = LiveView(drv)
        self.live.begin(o.engine, o.iterations, self.live_grid, self.live_rounds)

    # ------------------------------------------------------------------ the lifecycle
    def run(self):
        """Start, iterate and finish, starting again from the last checkpoint (or the
        start) on the live workers after every lost worker.

        Returns
        -------
        :class:`RunOutput`
        """
        while True:
            try:
                self._start()
                self._iterate()
                return self.finish()
            except WorkerLost as e:
                self._recover(e)

    def key(self, name, *parts):
        """A key of this run and attempt: ``(name, *parts, tag)``."""
        return (name, *parts, self.tag)

    def _start(self):
        o = self.problem.options
        self.tag = f"{self.run_id}.{len(self.recoveries)}"
        self.pending, self.saving, self.fetched = [], {}, {}
        if self.meta is None:
            self.first, self.costs = 0, []
        else:
            self.first = int(self.meta["completed"])
            self.costs = [float(v) for v in self.ck.read(self.meta, "cost")]
        with self.drv.span("load"):
            for unit, idx in self.units.items():
                if unit not in self.data:  # patterns stay where their worker lives on
                    self.data[unit] = self.drv.submit_pinned(load_tile_patterns, self.source, idx, o.device,
                                                             worker=self.workers[unit], key=self.key("load", *unit))
        self.begin(self.meta)

    def _iterate(self):
        o = self.problem.options
        for it in range(self.first, o.iterations):
            with self.drv.span("iteration"):
                step = self.step(it)
            step.image = self.preview(it)
            self.pending.append(step)
            if o.checkpoint_every and ((it + 1) % o.checkpoint_every == 0 or it + 1 == o.iterations):
                self._save(it)
            if len(self.pending) > self.lookahead:  # report an earlier iteration while this one runs
                self._report()
        while self.pending:
            self._report()
        self.live.flush()

    def _report(self):
        step = self.pending[0]
        extras = list(step.extras)
        waited = step.costs + [step.extras[k] for k in extras] + self.live.futures(step.image)
        if not all(f is None or f.done() for f in waited):
            self.live.flush()  # what the page has not seen goes out before the run waits
        self.drv.wait_alive(waited, self.workers)
        self.pending.pop(0)
        got = self._fetch(step.costs + [step.extras[k] for k in extras], step.cost_index is not None)
        costs = got[:len(step.costs)]
        if step.cost_index is not None:
            costs = [c[i] for c, i in zip(costs, step.cost_index)]
        cost = float(sum(costs))  # rounds in a fixed order
        self.costs.append(cost)
        self.record(step.it, dict(zip(extras, got[len(step.costs):])))
        self.live.publish(step.it, cost, step.image, tiles_done=self.tiles_done_with_cost)
        if self.progress is not None:
            self.progress(step.it, cost)
        if step.it in self.saving:
            self._commit(step.it)

    def _fetch(self, futures, shared):
        """The results of ``futures``. With ``shared``, the results are kept until an
        iteration no longer asks for them: a block's costs are one future its iterations
        share, fetched once."""
        if not shared:
            return self.drv.results(futures, self.workers)
        live = [f for f in futures if f is not None]
        todo = [f for f in live if f.key not in self.fetched]
        kept = {f.key: self.fetched[f.key] for f in live if f.key in self.fetched}
        self.fetched = {**kept, **dict(zip((f.key for f in todo), self.drv.results(todo, self.workers)))}
        return [None if f is None else self.fetched[f.key] for f in futures]

    def _save(self, it):
        """Begin the checkpoint after iteration ``it``: the arrays' metadata, then each
        unit's worker writes its own; the pointer moves when the cost is in (:meth:`_report`)."""
        path = self.ck.begin(it + 1, self.checkpoint_arrays())
        writes, small = self.checkpoint_writes(path, it)
        self.saving[it] = (path, writes, small)
        if self.writes_before_next:
            self.drv.wait_alive(writes, self.workers)

    def _commit(self, it):
        path, writes, small = self.saving.pop(it)
        self.drv.wait_alive(writes, self.workers)
        names = list(small)
        taken = {n: v for n, v in zip(names, self.drv.results([small[n] for n in names], self.workers)) if v is not None}
        arrays = {n: np.asarray(v) for n, v in taken.items()}
        arrays.update(self.checkpoint_small())
        arrays["cost"] = np.asarray(self.costs, dtype=np.float64)
        self.ck.commit(path, checkpoint_attrs(self.problem, it + 1, **self.checkpoint_attrs(taken)), small=arrays)

    def _recover(self, err):
        """After a lost worker: drop every future of the attempt, move the lost units to
        live workers, roll every unit back to the last checkpoint (or the start), log it.

        The futures are released, not cancelled: the scheduler forgets the tasks pinned to
        the lost worker (cancelling a future with unwanted dependents trips an assertion in
        distributed's ``Scheduler.stimulus_cancel``). Patterns stay where their worker lives;
        the lost units reload theirs from the store.
        """
        self.pending, self.saving, self.fetched = [], {}, {}
        self.drop()
        self.drv.abort_peers(self.tag, f"lost worker(s) {', '.join(err.lost) or '(unknown)'}")
        at = len(self.costs)
        if len(self.recoveries) >= self.max_recoveries:
            raise RecoveryError(f"workers keep dying: {len(self.recoveries)} recoveries already (daskptycho.recovery.max_recoveries); "
                                f"last at iteration {at}: {err}")
        before = self.workers
        self.workers, moved = self.drv.replace_lost(before, expected_workers=self.n_workers)
        # the error may have come before the scheduler named the worker (a cancelled key)
        lost = sorted(set(err.lost) | {before[k] for k in moved})
        for k in list(self.data):
            if k in moved or self.data[k].status != "finished":
                del self.data[k]
        if not isinstance(self.source, str) and getattr(self.source, "status", "finished") != "finished":
            raise RecoveryError(f"{err}; the patterns were scattered from memory and are lost with it: "
                                "reconstruct from a store (daskptycho.write_dataset) to survive lost workers")
        self.meta = self.ck.latest() if self.ck is not None else None
        frm = int(self.meta["completed"]) if self.meta else 0
        moved_to = {self.unit_name(k): self.workers[k] for k in moved}
        self.recoveries.append({"at_iteration": at, "lost_workers": lost, f"{self.unit_label.split()[-1]}_moved": moved_to,
                                "resumed_from_iteration": frm, "from": "checkpoint" if self.meta else "start"})
        logging.getLogger("daskptycho").warning(
            "lost worker %s at iteration %d; %s %s moved to %s; resuming from %s",
            ", ".join(lost) or "(unknown)", at, self.unit_label, " ".join(moved_to) or "(none)",
            json.dumps(sorted(set(moved_to.values()))),
            f"the checkpoint after iteration {frm}" if self.meta else "the start (no checkpoint)")

    def unit_name(self, unit):
        """A unit's name in the recovery record and the log ("1,0" for tile (1, 0))."""
        return f"{unit[0]},{unit[1]}"

    def memory(self, states, *more):
        """The memory report: each unit's bytes (a task on its worker, with ``states`` and
        ``more`` per unit) and each worker's peak; returns it."""
        futs = [self.drv.submit_pinned(unit_bytes, states[k], self.data[k], *(m[k] for m in more), worker=self.workers[k],
                                       key=self.key("nbytes", *k)) for k in self.units]
        return self.drv.memory_report(dict(zip(self.units, self.drv.results(futs, self.workers))), self.workers)

    # ------------------------------------------------------------------ what an engine fills in
    def begin(self, meta):
        """Submit each unit's state: from the checkpoint ``meta``, or the start (None)."""
        raise NotImplementedError

    def step(self, it):
        """Submit iteration ``it`` (keeping the new state's futures) and return its :class:`Step`."""
        raise NotImplementedError

    def preview(self, it):
        """The live image of iteration ``it`` (:meth:`LiveView.preview`), or None."""
        return None

    def record(self, it, extras):
        """Keep the small results of iteration ``it`` (``{name: value}`` of :attr:`Step.extras`)."""

    def finish(self):
        """Fetch the final state: a :class:`RunOutput`."""
        raise NotImplementedError

    def drop(self):
        """Forget every future of the interrupted attempt (state, probe, context ...)."""
        raise NotImplementedError

    def checkpoint_arrays(self):
        """``{name: (shape, dtype)}`` of the arrays the units' workers write."""
        raise NotImplementedError

    def checkpoint_writes(self, path, it):
        """Submit the writes of the checkpoint at ``path`` after iteration ``it``: returns
        the write futures and ``{name: future}`` of small arrays taken now, written by the
        client when the checkpoint is committed (a future whose value is None is left out)."""
        raise NotImplementedError

    def checkpoint_small(self):
        """Small host arrays the commit writes besides ``cost``."""
        return {}

    def checkpoint_attrs(self, small):
        """What the checkpoint records about this engine's layout (tiles, partitions ...);
        ``small``: the small arrays taken (``{name: value}``, Nones left out)."""
        return {}


def checkpoint_attrs(problem, completed, **extra):
    """What a checkpoint records besides its arrays: engine, iteration, options and the
    random state (the engines draw no random numbers after initialisation: the seed
    reproduces everything, minibatch orders come from ``(seed, iteration)``)."""
    o = problem.options
    return {"engine": o.engine, "completed": int(completed), "options": dataclasses.asdict(o), "seed": o.seed,
            "random_state": "none consumed after initialisation; minibatch orders are drawn from (seed, iteration)", **extra}


def resume_meta(problem):
    """The latest complete checkpoint of a run asked to resume (its attributes, with
    ``group``), or None."""
    o = problem.options
    return Checkpoint(o.checkpoint).latest() if (o.checkpoint and o.resume) else None
