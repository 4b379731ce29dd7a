"""The task of the single-task reference engine (``ml``): one whole iteration on the
worker holding the whole object and every pattern.

Full batch (``batch_size=None``) is exact gradient descent with a diagonal
preconditioner; minibatches (the first iterations with the default ``batch_size="auto"``:
:meth:`~daskptycho.engines.options.MinibatchOptions.batch_at`) visit the positions in equal
batches of a random order drawn from ``(seed, iteration)``, so any iteration can be replayed.

With ``position_correction`` the state also carries ``positions``: each probe centre's
continuous estimate in pixel coordinates of the object grid (float64 (J, 2), host
memory), refined on schedule by :func:`daskptycho.physics.positions.refine_positions`;
the windows are cut at the rounded estimates.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, to_host
from ..io.checkpoint import read_state
from ..physics.positions import refine_positions, search_positions, window_corners_of
from .updates import gradient_sum, minibatches, object_step, probe_step

#: Fraction of the way to each position's parabolic cost minimum one refinement moves it
#: (see docs/position-correction.md for the measurements that chose it).
POSITION_STEP = 0.5


def ml_init(problem):
    """Starting state: the problem's object and probe (and, with position correction,
    the store's positions in pixel coordinates of the object grid)."""
    state = {"object": problem.initial_object(np), "probe": problem.probe.copy(), "cost": float("nan")}
    if getattr(problem.options, "position_correction", False):
        state["positions"] = start_positions(problem)
    return state


def start_positions(problem):
    """The store's probe centres in pixel coordinates of the object grid: float64 (J, 2)."""
    return problem.grid.pixel_coordinates(problem.positions_m).astype(np.float64)


def refines_positions(options, it):
    """Whether iteration ``it`` (0-based) refines the positions first."""
    return (getattr(options, "position_correction", False) and it >= options.position_correction_start
            and (it - options.position_correction_start) % options.position_correction_every == 0)


def refine_ml_positions(obj, probe, kernel, data, mask, positions, it, problem):
    """The positions after iteration ``it``'s refinement (float64 (J, 2), pixel coordinates).

    The first refinement searches every whole-pixel window within
    ``position_max_shift_px`` first (:func:`~daskptycho.physics.positions.search_positions`):
    the parabolic step alone only goes downhill from the current window, and positions
    more than about two pixels off walk the wrong way. No common shift is removed: the
    windows are whole pixels, so the integer grid pins the scan's translation, and
    removing the continuous mean shift instead pulled regions of the scan onto
    neighbouring pixels (docs/position-correction.md).
    """
    opts = problem.options
    start = start_positions(problem)
    if it == opts.position_correction_start:
        positions = search_positions(obj, probe, kernel, data, positions, start, int(np.ceil(opts.position_max_shift_px)), mask,
                                     opts.cost, opts.position_max_shift_px, chunk=problem.chunk)
    return refine_positions(obj, probe, kernel, data, positions, start, mask, opts.cost, opts.position_max_shift_px,
                            step=POSITION_STEP, chunk=problem.chunk)


def ml_step(state, data, it, problem):
    """One iteration of the reference engine (a pure function of its inputs).

    Parameters
    ----------
    state : dict with ``object`` (S, H, W) and ``probe`` (K, N, N); with position
        correction also ``positions`` (J, 2) float64, pixel coordinates of the probe centres
    data : float32 array (J, N, N), FFT order
    it : int, the iteration number (selects the minibatch order and probe refinement)
    problem : :class:`~daskptycho.engines.problem.Problem`, the fixed geometry and options

    Returns
    -------
    dict: the new ``object`` and ``probe`` (and ``positions``) and the ``cost`` measured
    during the iteration. An iteration that refines the positions does so first, against
    the object and probe it starts from, and then updates them at the new windows.
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
    corners, positions = problem.corners, state.get("positions")
    if positions is not None:
        if refines_positions(opts, it):
            positions = refine_ml_positions(obj, probe, kernel, data, mask, positions, it, problem)
        corners = window_corners_of(positions, problem.window)
    n_batches = minibatches(j, opts.batch_at(it))
    if n_batches == 1:
        batches = [np.arange(j)]
    else:
        batches = np.array_split(np.random.default_rng([opts.seed, it]).permutation(j), n_batches)
    cost = 0.0
    for b in batches:
        g = gradient_sum(obj, probe, corners, problem.window, kernel, data, b, mask, opts.cost, problem.chunk, refine,
                         budget_mib=problem.working_set_budget_mib)
        cost += g["cost"]
        obj = object_step(obj, g["object"], g["illumination"], opts.step, problem.eps_object(len(b)), amplitude_max=opts.amplitude_max())
        if refine:
            probe = probe_step(probe, g["probe"], g["probe_illumination"], opts.probe_step, opts.regularization)
    # the state stays in the worker's (device) memory; only the cost is a Python float
    out = {"object": obj, "probe": probe, "cost": cost}
    if positions is not None:
        out["positions"] = positions
    return out


def ml_state_on_host(state):
    """The state in host memory (NumPy), for the client: the end of a run."""
    return to_host(state)


def state_names(options):
    """The arrays of the state a checkpoint keeps."""
    return ("object", "probe", "positions") if getattr(options, "position_correction", False) else ("object", "probe")


def ml_restore(group, device="cpu", names=("object", "probe")):
    """The state saved in a checkpoint group (read on the worker that runs the engine);
    ``names``: :func:`state_names` of the run's options."""
    state = read_state(group, names, device="cpu")
    state["cost"] = float("nan")
    return state
