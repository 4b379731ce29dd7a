"""Which incident waves the multislice adjoint keeps, and what that costs.

The adjoint of slice ``s`` (:func:`daskptycho.physics.multislice.backward`) needs the
wave incident on slice ``s``. Keeping every slice's wave for the backward pass costs S
waves per position and mode; one position of S = 100 slices at N = 1024 then holds
about 0.8 GB of waves, more than a GPU's or a worker's share of memory on thick samples.

With a checkpoint interval ``c > 1`` the forward pass keeps the incident wave only at
slices 0, c, 2c, ... (the *checkpoints*; slice 0's is the probe) and the waves of the
last segment ``[c (n - 1), S)``, where the backward pass starts. Before going back
through an earlier segment ``[a, a + c)``, the backward pass recomputes its waves from
the checkpoint at ``a`` by the same operations the forward pass ran, so the gradients
are the same bits. A position then holds about ``ceil(S / c) + c`` waves instead of S
(least near ``c = sqrt(S)``), and the adjoint repeats ``c - 1`` propagations (two FFTs
per mode each) in every segment but the last: ``(ceil(S / c) - 1) (c - 1)`` in all.
An interval of 1, or of S or more (one segment, all of whose waves the forward pass
leaves in place), keeps every wave and recomputes nothing.

Functions
---------
:func:`segments`, :func:`recomputed_propagations`, :func:`gradient_ffts`
    The bookkeeping: segment bounds, repeated propagations, FFTs per position.
:func:`gradient_working_set`
    Bytes one position of a gradient call holds on each hot path, for an interval.
:func:`wave_checkpoint_interval`
    The ``auto`` rule: the interval a memory budget calls for (pure).
:func:`configured_wave_checkpoints`, :func:`checkpoint_interval`
    ``daskptycho.reconstruct.wave_checkpoints`` read and checked, and applied to a budget.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import config
from ..errors import OptionsError

__all__ = ["PATHS", "segments", "effective_interval", "recomputed_propagations", "gradient_ffts", "gradient_working_set",
           "wave_checkpoint_interval", "configured_wave_checkpoints", "checkpoint_interval"]

#: the hot paths whose working sets :func:`gradient_working_set` knows: the batched NumPy
#: and fused-kernel path, the compiled per-position path and the CUDA orchestration
PATHS = ("batched", "positions", "cuda")

_COMPLEX64 = 8  # bytes


def effective_interval(interval, slices):
    """The interval the hot paths run: ``interval``, or 1 when it keeps every wave anyway
    (``interval >= slices``: one segment, left in place by the forward pass).

    Parameters
    ----------
    interval : int >= 1
    slices : int >= 1

    Returns
    -------
    int, 1 or in [2, slices - 1]
    """
    interval = int(interval)
    if interval < 1:
        raise ValueError(f"the wave checkpoint interval must be >= 1, got {interval}")
    return 1 if interval >= slices else interval


def segments(slices, interval):
    """The segments ``(start, stop)`` of the slices: slices ``start .. stop - 1`` are
    recomputed together from the incident wave of ``start`` (a checkpoint).

    Parameters
    ----------
    slices : int >= 1
    interval : int >= 1

    Returns
    -------
    list of (int, int), in slice order; every segment has c slices but the last, which
    has ``slices - c (n - 1)``, for c the :func:`effective_interval` (an interval of
    ``slices`` or more runs as 1: one slice per segment, nothing recomputed).
    """
    interval = effective_interval(interval, slices)
    return [(a, min(a + interval, slices)) for a in range(0, slices, interval)]


def recomputed_propagations(slices, interval):
    """Propagations (slice transmission, FFT, Fresnel kernel, inverse FFT) the adjoint
    repeats per position and mode: ``len - 1`` for every segment but the last, whose
    waves the forward pass leaves in place.

    Returns
    -------
    int, ``(ceil(S / c) - 1) (c - 1)`` for an effective interval c (0 for c = 1)
    """
    return sum(b - a - 1 for a, b in segments(slices, interval)[:-1])


def gradient_ffts(slices, modes, interval=1):
    """2-D FFTs (of N_y x N_x) of one position's cost and gradient.

    Forward: ``S - 1`` propagations (2 FFTs each) and the far-field FFT; backward: the
    far-field inverse FFT and ``S - 1`` adjoint propagations; recomputation: 2 per
    recomputed propagation; each per probe mode.

    Returns
    -------
    int, ``2 K (2 S - 1) + 2 K r`` with ``r`` = :func:`recomputed_propagations`
    """
    return 2 * modes * (2 * slices - 1) + 2 * modes * recomputed_propagations(slices, interval)


def gradient_working_set(slices, modes, window, interval=1, path="batched"):
    """Bytes one position of a gradient call holds while it runs, on one hot path.

    With ``n = ceil(S / c)`` segments of at most ``L = min(c, S)`` slices (c the
    :func:`effective_interval`), counted in complex64 waves of ``N_y x N_x``:

    ``batched`` (:func:`~daskptycho.physics.multislice.gradients` on NumPy, plain or fused kernels)
        kept incident waves ``K (n + L - 1)`` (every slice's, ``K S``, for c = 1), the
        object patches ``S`` (c = 1) or one segment's ``L`` (c > 1: cut per segment), and
        ``6 K`` of far field, gradient and FFT and cost temporaries.
    ``positions`` (the compiled per-position model)
        its scratch: ``max(n + L - 2, 1)`` waves of K modes for the incident waves of
        slices 1 .. S - 1 (checkpoints and one segment), and the wave it transforms.
    ``cuda`` (:func:`~daskptycho.physics.cuda.gradients`)
        the kept waves but the probe, ``K (n - 1 + L - 1)``, the wave being transmitted
        and the gradient, ``2 K``, and the float32 cost map (half a wave).

    Parameters
    ----------
    slices, modes : int
        S and K.
    window : (int, int)
        (N_y, N_x).
    interval : int >= 1
        The checkpoint interval c.
    path : {"batched", "positions", "cuda"}

    Returns
    -------
    int, bytes
    """
    c = effective_interval(interval, slices)
    n = -(-slices // c)
    span = min(c, slices)
    nn = int(window[0]) * int(window[1])
    if path == "batched":
        patches = slices if c == 1 else span
        waves = modes * (n + span - 1) + patches + 6 * modes
        return waves * nn * _COMPLEX64
    if path == "positions":
        return modes * (max(n + span - 2, 1) + 1) * nn * _COMPLEX64
    if path == "cuda":
        return (modes * (n + span) * _COMPLEX64 + 4) * nn
    raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")


def wave_checkpoint_interval(slices, modes, window, budget_bytes, path="batched"):
    """The checkpoint interval the ``auto`` setting picks for a memory budget.

    Keep every wave (1) when one position's full working set fits ``budget_bytes``: runs
    that fit recompute nothing. Otherwise the smallest interval whose working set fits
    (the fewest recomputed propagations), or, when none fits, the interval of least
    memory (near ``sqrt(S)``; the smallest of equals).

    Parameters
    ----------
    slices, modes : int
        S and K.
    window : (int, int)
        (N_y, N_x).
    budget_bytes : float
        What one position of the call may hold (bytes); ``inf``: no limit.
    path : {"batched", "positions", "cuda"}
        Whose working set counts (:func:`gradient_working_set`).

    Returns
    -------
    int, 1 or in [2, S - 1]
    """
    if gradient_working_set(slices, modes, window, 1, path) <= budget_bytes:
        return 1
    best, least = 1, gradient_working_set(slices, modes, window, 1, path)
    for c in range(2, slices):
        need = gradient_working_set(slices, modes, window, c, path)
        if need <= budget_bytes:
            return c
        if need < least:
            best, least = c, need
    return best


def configured_wave_checkpoints():
    """``daskptycho.reconstruct.wave_checkpoints``: ``"auto"`` or an interval >= 1.

    Raises
    ------
    OptionsError
        Neither ``auto`` (or null) nor an integer >= 1.
    """
    import dask.config

    try:
        value = dask.config.config["daskptycho"]["reconstruct"]["wave_checkpoints"]
    except (KeyError, TypeError):
        value = config.get("reconstruct.wave_checkpoints", "auto")
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1:
        return int(value)
    raise OptionsError("reconstruct.wave_checkpoints",
                       f"is {value!r}; use auto or an integer >= 1 (1 keeps every slice's wave) "
                       "(daskptycho.yaml or DASK_DASKPTYCHO__RECONSTRUCT__WAVE_CHECKPOINTS)")


def checkpoint_interval(slices, modes, window, budget_bytes=math.inf, path="batched", setting=None):
    """The interval a gradient call runs: the setting's integer, or under ``auto`` the
    :func:`wave_checkpoint_interval` of ``budget_bytes``.

    Parameters
    ----------
    slices, modes, window, path : as :func:`wave_checkpoint_interval`
    budget_bytes : float or None
        What one position may hold; None or ``inf``: no limit (``auto`` keeps every wave).
    setting : "auto" or int, optional
        Default: :func:`configured_wave_checkpoints`.

    Returns
    -------
    int >= 1 (as given: the hot paths run 1 for an interval of S or more)
    """
    setting = configured_wave_checkpoints() if setting is None else setting
    if setting != "auto":
        return int(setting)
    if budget_bytes is None:
        return 1
    return wave_checkpoint_interval(slices, modes, window, budget_bytes, path)
