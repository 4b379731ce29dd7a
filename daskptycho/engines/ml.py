"""The reference engine: maximum-likelihood gradient descent on the whole object.

One task holds the whole object and every pattern (the single-GPU baseline of the
gradient-decomposition paper). Full batch (``batch_size=None``) is exact gradient
descent with a diagonal preconditioner; minibatches visit the positions in a
random order drawn from ``(seed, iteration)``, so any iteration can be replayed.
"""

from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from .problem import Problem, array_module
from .updates import gradient_sum, object_step, probe_step


def load_patterns(ds, scan_indices=None):
    """Intensities of the given scan points as float32 in FFT order (zero frequency at [0, 0]).

    Reads one stored chunk at a time into the output, so the peak memory is the
    selected patterns plus one chunk, whatever the size of the store.

    Returns
    -------
    float32 array (J, N, N)
    """
    data = ds["intensity"].data
    n = data.shape[0]
    idx = np.arange(n) if scan_indices is None else np.asarray(scan_indices, dtype=np.int64)
    out = np.empty((idx.size,) + tuple(data.shape[1:]), dtype=np.float32)
    bounds = np.cumsum((0,) + tuple(data.chunks[0])) if hasattr(data, "chunks") and data.chunks else np.array([0, n])
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        take = np.flatnonzero((idx >= lo) & (idx < hi))
        if take.size == 0:
            continue
        block = data.blocks[b] if hasattr(data, "blocks") else data[lo:hi]
        block = np.asarray(block.compute(scheduler="synchronous") if hasattr(block, "compute") else block)
        out[take] = np.fft.ifftshift(block[idx[take] - lo], axes=(-2, -1))
    return out


def load_patterns_from_store(path, scan_indices=None):
    """Read patterns straight from a store; runs on the worker that owns them."""
    from ..io.store import open_dataset

    return load_patterns(open_dataset(path, check_values=False), scan_indices)


def ml_init(problem: Problem):
    """Starting state: the problem's object and probe."""
    return {"object": problem.initial_object(np), "probe": problem.probe.copy(), "cost": float("nan")}


def ml_step(state, data, it, problem: Problem):
    """One iteration of the reference engine (a pure function of its inputs).

    Parameters
    ----------
    state : dict with ``object`` (S, H, W) and ``probe`` (K, N, N)
    data : float32 array (J, N, N), FFT order
    it : int, the iteration number (selects the minibatch order and probe refinement)

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
        g = gradient_sum(obj, probe, problem.corners, problem.window, kernel, data, b, mask, opts.cost, problem.chunk, refine)
        cost += g["cost"]
        obj = object_step(obj, g["object"], g["illumination"], opts.step, problem.eps_object(len(b)))
        if refine:
            probe = probe_step(probe, g["probe"], g["probe_illumination"], opts.probe_step, opts.regularization)
    return {"object": to_numpy(obj), "probe": to_numpy(probe), "cost": cost}


def run_ml(problem: Problem, data, progress=None, state=None):
    """Run the reference engine in this process (no cluster).

    Returns
    -------
    obj : complex64 array (S, H, W); probe : (K, N, N); costs : list of float
    """
    state = state or ml_init(problem)
    costs = []
    for it in range(problem.options.iterations):
        state = ml_step(state, data, it, problem)
        costs.append(state["cost"])
        if progress is not None:
            progress(it, state["cost"])
    return state["object"], state["probe"], costs


def ml_restore(group, device="cpu"):
    """The state saved in a checkpoint group (read on the worker that runs the engine)."""
    from ..io.checkpoint import read_state

    state = read_state(group, ("object", "probe"), device="cpu")
    return {"object": state["object"], "probe": state["probe"], "cost": float("nan")}


def ml_checkpoints(drv, problem: Problem, meta=None):
    """What :meth:`~daskptycho.engines.driver.Driver.run_sequential` needs to resume
    from the checkpoint ``meta`` and to write checkpoints every ``checkpoint_every``.

    Returns
    -------
    init : callable or None (None: start from :func:`ml_init`), start : int, costs : list,
    after : callable(it, state, costs, worker) or None
    """
    import os
    import uuid
    from functools import partial

    from ..io.checkpoint import Checkpoint, write_state
    from .gd import _checkpoint_attrs

    o = problem.options
    ck = Checkpoint(o.checkpoint) if o.checkpoint else None
    init, start, costs = None, 0, []
    if meta is not None:
        init, start = partial(ml_restore, meta["group"]), int(meta["completed"])
        costs = [float(v) for v in ck.read(meta, "cost")]
    if not o.checkpoint_every:
        return init, start, costs, None

    def after(it, state, costs, worker):
        if (it + 1) % o.checkpoint_every and it + 1 != o.iterations:
            return
        shape = (o.slices,) + tuple(problem.grid.shape)
        path = ck.begin(it + 1, {"object": (shape, np.complex64), "probe": (problem.probe.shape, np.complex64)})
        # the worker holding the state writes it; only the scalar byte count comes back
        written = drv.client.submit(write_state, path, state, ("object", "probe"), key=("checkpoint", it, os.path.basename(path), uuid.uuid4().hex[:8]),
                                    workers=[worker], allow_other_workers=False, pure=False)
        drv.results([written], {(0, 0): worker})
        ck.commit(path, _checkpoint_attrs(problem, it + 1), small={"cost": np.asarray(costs, dtype=np.float64)})

    return init, start, costs, after
