"""Engine ``ml``: the reference, maximum-likelihood gradient descent on the whole object.

One task per iteration holds the whole object and every pattern (the single-GPU
baseline of the gradient-decomposition paper); the run is the shared skeleton with one
unit. :func:`run_ml` runs the same arithmetic in this process, without a cluster.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass

import numpy as np

from ..io.checkpoint import write_state
from ..schedule.graph import IterationGraph
from ..tasks.ml import ml_init, ml_restore, ml_state_on_host, ml_step, state_names
from .options import MinibatchOptions, Number, PositionOptions, option
from .problem import Problem
from .run import PinnedRun, RunOutput, Step

#: the single unit of the run
UNIT = (0, 0)


@dataclass(kw_only=True)
class MLOptions(MinibatchOptions, PositionOptions):
    """Options of engine ``ml`` (the single-task reference).

    Attributes
    ----------
    workers : int or None
        Workers of an embedded cluster: 1 (the run has one unit).

    The minibatch options are :class:`~daskptycho.engines.options.MinibatchOptions`'s, the
    position-correction options :class:`~daskptycho.engines.options.PositionOptions`'s.
    """

    ENGINE = "ml"
    engine: str = "ml"
    workers: int | None = option(Number(True, 1, none=True), 1)


class MLRun(PinnedRun):
    """Engine ``ml``: one unit holding the whole object, the probe and every pattern;
    only each iteration's cost travels back (one iteration queued ahead)."""

    def __init__(self, drv, problem, source, progress=None):
        self.units = {UNIT: np.arange(problem.n_positions)}
        self.state = self.ctx = None
        super().__init__(drv, problem, source, progress)

    def begin(self, meta):
        # the problem (geometry, probe guess, options) goes to the worker once
        self.ctx = self.drv.client.scatter(self.problem, hash=False)
        w = self.workers[UNIT]
        with self.drv.span("load"):
            if meta is None:
                self.state = self.drv.submit_pinned(ml_init, self.ctx, worker=w, key=self.key("init", *UNIT))
            else:
                self.state = self.drv.submit_pinned(ml_restore, meta["group"], "cpu", state_names(self.problem.options), worker=w,
                                                    key=self.key("restore", *UNIT))

    def step(self, it):
        g = IterationGraph(tag=self.tag)
        state = g.add(("ml-iteration", it), (ml_step, self.state, self.data[UNIT], it, self.ctx), UNIT)
        cost = g.add(("cost", it), (operator.getitem, state, "cost"), UNIT)
        fut = self.drv.submit_graph(g, self.workers, [state, cost])
        self.state = fut[state]
        return Step(it, [fut[cost]])

    def preview(self, it):
        return self.live.preview(it, {UNIT: self.state}, self.workers)

    def checkpoint_arrays(self):
        shape = (self.problem.options.slices,) + tuple(self.problem.grid.shape)
        arrays = {"object": (shape, np.complex64), "probe": (self.problem.probe.shape, np.complex64)}
        if "positions" in state_names(self.problem.options):
            arrays["positions"] = ((self.problem.n_positions, 2), np.float64)
        return arrays

    def checkpoint_writes(self, path, it):
        # the worker holding the state writes it; only the byte count comes back
        return [self.drv.submit_pinned(write_state, path, self.state, state_names(self.problem.options), worker=self.workers[UNIT],
                                       key=self.key("checkpoint", it, *UNIT))], {}

    def finish(self):
        host = self.drv.submit_pinned(ml_state_on_host, self.state, worker=self.workers[UNIT], key=self.key("host", *UNIT))
        (state,) = self.drv.results([host], self.workers)
        memory = self.memory({UNIT: self.state})
        return RunOutput(np.asarray(state["object"]), np.asarray(state["probe"]), self.costs,
                         {"memory": json.dumps(memory), "recoveries": json.dumps(self.recoveries)},
                         result_variables(self.problem, state))

    def drop(self):
        self.state = self.ctx = None


def positions_in_metres(problem: Problem, positions_px):
    """Probe centres (J, 2) in pixel coordinates of the problem's grid, in metres (the
    frame of the store's ``position``)."""
    g = problem.grid
    return np.asarray(g.origin_m, dtype=np.float64) + np.asarray(positions_px, dtype=np.float64) * g.pixel_size_m


def result_variables(problem: Problem, state):
    """The result's variables besides object, probe and cost: ``position_refined`` (scan,
    yx) metres, with position correction."""
    if "positions" not in state:
        return {}
    import xarray as xr

    return {"position_refined": xr.DataArray(
        positions_in_metres(problem, state["positions"]), dims=("scan", "yx"),
        coords={"scan": np.arange(problem.n_positions), "yx": np.array(["y", "x"], dtype=object)},
        attrs={"units": "m", "long_name": "probe centre after position correction (same frame as the input's position)"})}


def run_ml_state(problem: Problem, data, progress=None, state=None):
    """Run the reference engine in this process (no cluster).

    Returns
    -------
    state : dict of host arrays
        ``object`` complex64 (S, H, W), ``probe`` (K, N, N), with position correction
        ``positions`` float64 (J, 2) (pixel coordinates, :func:`positions_in_metres`).
    costs : list of float
    """
    state = state or ml_init(problem)
    costs = []
    for it in range(problem.options.iterations):
        state = ml_step(state, data, it, problem)
        costs.append(state["cost"])
        if progress is not None:
            progress(it, state["cost"])
    return ml_state_on_host(state), costs


def run_ml(problem: Problem, data, progress=None, state=None):
    """Run the reference engine in this process (no cluster).

    Returns
    -------
    obj : complex64 array (S, H, W); probe : (K, N, N); costs : list of float
    """
    state, costs = run_ml_state(problem, data, progress, state)
    return state["object"], state["probe"], costs


def run(drv, ds, problem, source, progress=None):
    """Run engine ``ml`` on the driver's cluster (the registry's signature)."""
    return problem, MLRun(drv, problem, source, progress).run()
