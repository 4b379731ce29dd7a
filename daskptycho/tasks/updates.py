"""Gradient sums over position chunks and the preconditioned descent step.

Shared by every gradient engine (``ml`` in one task, ``gd`` per tile), so the
distributed engines apply exactly the reference arithmetic.
"""

from __future__ import annotations

import numpy as np

from .. import physics
from ..backend import get_array_module, is_gpu
from ..physics import cuda
from ..physics.wave_checkpoints import checkpoint_interval, gradient_working_set

# Below this a vectorised call shrinks to one or two positions on a small tile and the
# per-call overhead (Python, one FFT call per slice) outweighs the arithmetic.
MIN_WORKING_SET_MIB = 8

#: minibatches per iteration with ``batch_size="auto"`` (docs/convergence.md: on a
#: thick crystal 4 and 5 equal minibatches did best; 2 and 7 did worse, 1 (full batch) worst)
AUTO_MINIBATCHES = 4


def minibatches(n_positions, batch_size):
    """How many equal minibatches ``n_positions`` positions make with ``batch_size``
    (``"auto"``: :data:`AUTO_MINIBATCHES`; None: 1, the full batch).

    Equal sizes (``numpy.array_split``) rather than full batches and a remainder: a
    remainder of a few positions stepped alone moves its windows by their own noise."""
    n_positions = int(n_positions)
    if batch_size is None or n_positions <= 1:
        return 1
    if batch_size == "auto":
        return min(AUTO_MINIBATCHES, n_positions)
    return max(1, -(-n_positions // int(batch_size)))


def working_set_budget(state_bytes, cap_mib, fraction):
    """Transient budget (MiB) of a gradient call for a tile holding ``state_bytes``:
    at most ``cap_mib`` and at most ``fraction`` of the state (but not below
    ``MIN_WORKING_SET_MIB`` unless ``cap_mib`` is), so a worker's memory stays
    proportional to the tile it owns."""
    return min(cap_mib, max(fraction * state_bytes / 2**20, MIN_WORKING_SET_MIB))


def positions_per_chunk(window, slices, modes, budget_mib, wave_checkpoints=None):
    """How many positions one vectorised gradient call may take within ``budget_mib``.

    The call keeps, per position, the incident wave of every slice and mode and the
    object patch of every slice (for the adjoint), plus a few mode-sized temporaries
    (far field, its gradient, FFT work arrays), all complex64; with a wave checkpoint
    interval, the waves and patches of the checkpoints and one segment only
    (:func:`~daskptycho.physics.wave_checkpoints.gradient_working_set`, ``batched``).

    Parameters
    ----------
    window : (N_y, N_x)
    slices, modes : int
    budget_mib : float
    wave_checkpoints : int, optional
        The interval the calls run; default: what :func:`gradient_sum` picks for this
        budget (``daskptycho.reconstruct.wave_checkpoints``).
    """
    budget = budget_mib * 2**20
    if wave_checkpoints is None:
        wave_checkpoints = checkpoint_interval(slices, modes, window, budget, "batched")
    per_position = gradient_working_set(slices, modes, window, wave_checkpoints, "batched")
    return max(1, int(budget // per_position))


def gradient_sum(obj, probe, corners, window, kernel, data, select, mask, cost, chunk, probe_gradient, counted=None,
                 budget_mib=None):
    """Sum of the gradients of the positions ``select`` over chunks of ``chunk``.

    Each chunk is one vectorised call of :func:`daskptycho.physics.gradients`;
    chunking bounds the transient memory (window indices, incident waves of every
    slice, the chunk's patterns): nothing of size (J, N, N) is made for all
    positions at once.

    Parameters
    ----------
    corners : int array (J, 2), window corners on ``obj``'s grid (host memory)
    window : (N_y, N_x)
    data : float array (J, N, N), FFT order
    select : int array, the positions (rows of ``corners`` and ``data``) to sum over
    counted : bool array (J,), optional
        The positions whose cost the returned ``cost`` sums (default: every one of
        ``select``). Gradients always sum over all of ``select``. A tile that holds
        positions owned by other tiles (hve) counts only its own, so the cost of an
        iteration counts every position once, as the other engines do.
    budget_mib : float, optional
        The call's working-set budget (:func:`working_set_budget`), which sets the wave
        checkpoint interval under ``daskptycho.reconstruct.wave_checkpoints: auto``
        (:func:`~daskptycho.physics.wave_checkpoints.checkpoint_interval`: every wave kept
        when one position's fit); None: no limit. On a GPU the device's launch budget
        (:func:`~daskptycho.physics.cuda.launch_budget`) sets it instead.

    Returns the dict of :func:`~daskptycho.physics.gradients`, summed.
    """
    xp = get_array_module(obj)
    select = np.asarray(select)
    # accumulators allocated once: each chunk scatters straight into them
    total = {"object": xp.zeros_like(obj), "illumination": xp.zeros(obj.shape, dtype=obj.real.dtype)}
    if probe_gradient:
        total["probe"] = xp.zeros_like(probe)
        total["probe_illumination"] = xp.zeros(probe.shape[-2:], dtype=probe.real.dtype)
    cost_sum = 0.0
    groups = [select] if counted is None else [select[counted[select]], select[~counted[select]]]
    if is_gpu(xp):
        return _gradient_sum_device(obj, probe, corners, window, kernel, data, groups, mask, cost, probe_gradient, total)
    per_position = physics.multislice.per_position_path(obj, probe)
    budget = None if budget_mib is None else budget_mib * 2**20
    interval = checkpoint_interval(obj.shape[0], probe.shape[0], window, budget, "positions" if per_position else "batched")
    # the counted positions first, then the others (whose cost is dropped)
    for g, group in enumerate(groups):
        step = max(group.size, 1) if per_position else chunk  # per position: no chunks needed
        for start in range(0, group.size, step):
            sel = group[start:start + step]
            # window corners, not flat indices: on the CPU patches are cut and added as slices
            win = physics.windows(corners[sel], window, obj.shape[-2:])
            if per_position:  # patterns read in place by row
                c = physics.gradients(obj, probe, win, kernel, data, mask, cost, probe_gradient, out=total, rows=sel,
                                      wave_checkpoints=interval)["cost"]
            else:
                c = physics.gradients(obj, probe, win, kernel, data[xp.asarray(sel)], mask, cost, probe_gradient, out=total,
                                      wave_checkpoints=interval)["cost"]
            if g == 0:
                cost_sum += c
    total["cost"] = cost_sum
    return total


def _gradient_sum_device(obj, probe, corners, window, kernel, data, groups, mask, cost, probe_gradient, total):
    """:func:`gradient_sum` on the GPU: the positions in launches as large as the device's
    memory allows (:func:`~daskptycho.physics.cuda.positions_per_launch`) at the wave
    checkpoint interval that budget calls for, patterns read by row where they lie, the
    cost summed on the device and read once at the end."""
    xp = get_array_module(obj)
    obj = obj.astype(xp.complex64, copy=False)
    probe = xp.asarray(probe).astype(xp.complex64, copy=False)
    data = data.astype(xp.float32, copy=False)
    dev_corners = cuda.cached_corners(corners, window, obj.shape[-2:], xp)
    budget = cuda.launch_budget(xp)
    interval = checkpoint_interval(obj.shape[0], probe.shape[0], window, budget, "cuda")
    chunk = cuda.positions_per_launch(window, obj.shape[0], probe.shape[0], xp, wave_checkpoints=interval, budget_bytes=budget)
    cost_sum = xp.zeros((), dtype=xp.float64)
    for g, group in enumerate(groups):
        rows_all = xp.asarray(np.asarray(group, dtype=np.int32))  # one upload per group
        for start in range(0, rows_all.size, chunk):
            rows = rows_all[start:start + chunk]
            c = cuda.gradients(obj, probe, dev_corners[rows], kernel, data, rows, mask, cost, probe_gradient, out=total,
                               wave_checkpoints=interval)["cost"]
            if g == 0:
                cost_sum += c
    total["cost"] = float(cost_sum)  # the one synchronisation of the call
    return total


def object_step(obj, grad, illumination, step, eps, amplitude_max=None):
    """``O - step * g / (2 (illumination + eps))``: a diagonal Gauss-Newton step.

    With ``step = 1`` and one slice this is the averaged-projection (error
    reduction) update; ``illumination`` is ``sum_j |incident wave|^2`` per slice.
    ``amplitude_max``: the new object's amplitudes are then clipped to it
    (:func:`clip_amplitude`; None: not clipped).
    """
    return object_step_consuming(obj, grad.copy(), illumination.copy(), step, eps, amplitude_max=amplitude_max)


def object_step_consuming(obj, grad, illumination, step, eps, slices=None, amplitude_max=None):
    """:func:`object_step` computed in ``grad`` and ``illumination`` (overwritten: the
    caller's own copies), with no other full-size temporary. ``slices``: the object's
    slice count when ``obj`` is a part of its slices (default ``obj.shape[0]``)."""
    # Every slice sees the whole residual: updating all S slices by a full step each
    # overshoots S-fold, so the step is shared among the slices.
    step = step / (slices or obj.shape[0])
    xp = get_array_module(grad)
    # step / (2 (illumination + eps)) first, then one product of the complex gradient by
    # that real array: a complex division by a real array costs 4x as much (67 us against
    # 18 us on a 144 x 142 tile), and a tile pays it every round
    illumination += eps
    xp.divide(step / 2, illumination, out=illumination)
    grad *= illumination
    out = obj - grad.astype(obj.dtype, copy=False)
    if amplitude_max is not None:
        clip_amplitude(out, amplitude_max)
    return out


def clip_amplitude(obj, amplitude_max):
    """Scale down, in place, every pixel of ``obj`` whose amplitude exceeds ``amplitude_max``
    to that amplitude (phase kept): a passive object transmits at most what it receives."""
    xp = get_array_module(obj)
    a = xp.abs(obj)
    obj *= amplitude_max / xp.maximum(a, amplitude_max)
    return obj


def probe_step(probe, grad, illumination, step, regularization):
    """Preconditioned probe step; ``illumination`` is ``sum_j |O_0 patch|^2`` (N, N)."""
    xp = get_array_module(probe)
    if is_gpu(xp):  # stays on the device: no synchronisation for the scalar
        eps = regularization * xp.mean(illumination) + 1e-30
    else:
        eps = regularization * float(xp.mean(illumination)) + 1e-30
    new = probe - (grad * (step / (2 * (illumination + eps)))).astype(probe.dtype)  # a real factor: no complex division
    if new.shape[0] > 1:
        # Incoherent modes are defined only up to a unitary mixing: the eigenmodes of
        # their density matrix, by decreasing power, are the ones to report (as dm's).
        # The model's intensities are unchanged, and so is every later step, which
        # commutes with the mixing (the preconditioner is the same for every mode).
        new = physics.orthogonalize_modes(new)[0]
    return new
