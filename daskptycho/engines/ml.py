"""The reference engine: maximum-likelihood gradient descent on the whole object.

One process holds the whole object and every pattern (the single-GPU baseline of
the gradient-decomposition paper). Full batch (``batch_size=None``) is exact
gradient descent with a diagonal preconditioner; minibatches visit the positions
in a seeded random order each iteration.
"""

from __future__ import annotations

import numpy as np

from .. import physics
from ..backend import to_numpy
from .problem import Problem, array_module
from .updates import gradient_sum, object_step, probe_step


def load_patterns(ds, scan_indices=None):
    """Intensities of the given scan points as float32 in FFT order (zero frequency at [0, 0])."""
    inten = ds["intensity"] if scan_indices is None else ds["intensity"].isel(scan=np.asarray(scan_indices))
    return np.fft.ifftshift(np.asarray(inten.values, dtype=np.float32), axes=(-2, -1))


def run_ml(problem: Problem, data, progress=None, state=None):
    """Run the reference engine.

    Parameters
    ----------
    problem : Problem
    data : float32 array (J, N, N), FFT order (see :func:`load_patterns`)
    progress : callable(iteration, cost), optional
    state : dict, optional
        ``object``, ``probe`` to start from (default: the problem's start).

    Returns
    -------
    obj : complex64 array (S, H, W); probe : (K, N, N); costs : list of float
    """
    opts = problem.options
    xp = array_module(opts.device)
    state = state or {}
    obj = xp.asarray(state.get("object", problem.initial_object(np)))
    probe = xp.asarray(state.get("probe", problem.probe))
    kernel = xp.asarray(problem.kernel)
    mask = None if problem.mask is None else xp.asarray(problem.mask)
    index = physics.window_index(problem.corners, problem.window, problem.grid.shape, xp)
    data = xp.asarray(data)
    j = problem.n_positions
    rng = np.random.default_rng(opts.seed)
    costs = []
    for it in range(opts.iterations):
        refine = opts.refine_probe and it >= opts.probe_refine_start
        if opts.batch_size is None or opts.batch_size >= j:
            batches = [np.arange(j)]
        else:
            order = rng.permutation(j)
            batches = [order[s:s + opts.batch_size] for s in range(0, j, opts.batch_size)]
        cost = 0.0
        for b in batches:
            bi = xp.asarray(b)
            g = gradient_sum(obj, probe, index[bi], kernel, data[bi], mask, opts.cost, opts.chunk_positions, refine)
            cost += g["cost"]
            obj = object_step(obj, g["object"], g["illumination"], opts.step, problem.eps_object(len(b)))
            if refine:
                probe = probe_step(probe, g["probe"], g["probe_illumination"], opts.probe_step, opts.regularization)
        costs.append(cost)
        if progress is not None:
            progress(it, cost)
    return to_numpy(obj), to_numpy(probe), costs
