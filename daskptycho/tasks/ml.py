"""The task of the single-task reference engine (``ml``): one whole iteration on the
worker holding the whole object and every pattern.

Full batch (``batch_size=None``) is exact gradient descent with a diagonal
preconditioner; minibatches visit the positions in a random order drawn from
``(seed, iteration)``, so any iteration can be replayed.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, to_host
from ..io.checkpoint import read_state
from .updates import gradient_sum, object_step, probe_step


def ml_init(problem):
    """Starting state: the problem's object and probe."""
    return {"object": problem.initial_object(np), "probe": problem.probe.copy(), "cost": float("nan")}


def ml_step(state, data, it, problem):
    """One iteration of the reference engine (a pure function of its inputs).

    Parameters
    ----------
    state : dict with ``object`` (S, H, W) and ``probe`` (K, N, N)
    data : float32 array (J, N, N), FFT order
    it : int, the iteration number (selects the minibatch order and probe refinement)
    problem : :class:`~daskptycho.engines.problem.Problem`, the fixed geometry and options

    Returns
    -------
    dict: the new ``object`` and ``probe`` and the ``cost`` measured during the iteration.
    """
    opts = problem.options
    xp = array_module(opts.device)
    obj = xp.asarray(state["object"])
    probe = xp.asarray(state["probe"])
    kernel = xp.asarray(problem.kernel)
    mask = None if problem.mask is None else xp.asarray(problem.mask)
    data = xp.asarray(data)
    j = problem.n_positions
    refine = opts.refine_probe and it >= opts.probe_refine_start
    if opts.batch_size is None or opts.batch_size >= j:
        batches = [np.arange(j)]
    else:
        order = np.random.default_rng([opts.seed, it]).permutation(j)
        batches = [order[s:s + opts.batch_size] for s in range(0, j, opts.batch_size)]
    cost = 0.0
    for b in batches:
        g = gradient_sum(obj, probe, problem.corners, problem.window, kernel, data, b, mask, opts.cost, problem.chunk, refine,
                         budget_mib=problem.working_set_budget_mib)
        cost += g["cost"]
        obj = object_step(obj, g["object"], g["illumination"], opts.step, problem.eps_object(len(b)))
        if refine:
            probe = probe_step(probe, g["probe"], g["probe_illumination"], opts.probe_step, opts.regularization)
    # the state stays in the worker's (device) memory; only the cost is a Python float
    return {"object": obj, "probe": probe, "cost": cost}


def ml_state_on_host(state):
    """The state in host memory (NumPy), for the client: the end of a run."""
    return to_host(state)


def ml_restore(group, device="cpu"):
    """The state saved in a checkpoint group (read on the worker that runs the engine)."""
    state = read_state(group, ("object", "probe"), device="cpu")
    return {"object": state["object"], "probe": state["probe"], "cost": float("nan")}
