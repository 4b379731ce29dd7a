"""Fused CPU kernels of the multislice hot path (Numba, optional extra ``fast``).

The NumPy code in :mod:`~daskptycho.physics.multislice` and :mod:`~daskptycho.physics.cost`
is the reference: it makes several passes over every (J, K, N_y, N_x) wave per slice
(cut the object windows, multiply, square, conjugate, multiply again, add the windows
back one by one), and on a CPU those passes, not the FFTs, took most of an iteration.
The compiled kernels (:mod:`~daskptycho.physics._compiled`) do each slice's
elementwise work in one pass, reading the object windows in place (no patches are cut
out) and adding into the object-sized accumulators as they go:

``multiply_windows``
    ``out[j, k] = psi[j, k] * O_s[window j]`` (the transmission through slice ``s``);
``cost_gradient``
    amplitude or Poisson cost of far-field waves and ``2 dL/dPsi*`` written over them;
``adjoint_slice``
    the adjoint of one slice: object gradient and illumination added into the
    accumulators, the wave gradient multiplied by ``conj(O_s)``, and at slice 0 the
    probe gradient and its illumination;
``position_gradients``
    with pyFFTW too: the whole model and its adjoint for one position at a time, FFTs
    included (FFTW's new-array execute on plans made here), so a position's waves stay
    in the core's cache through all its FFTs instead of streaming a batch of waves
    through memory for each of them. No (J, ...) arrays are made at all.

Which path runs is ``daskptycho.kernels``: ``auto`` (Numba when it imports, else
NumPy), ``numba`` (warn and use NumPy when it is missing) or ``numpy``. Compiled code
is cached on disk beside the module (Numba's ``cache=True``), so only the first process
on a machine pays the compilation (seconds); CuPy arrays always take the NumPy (CuPy)
path. Results agree with the NumPy path to float32 rounding (``tests/test_fused.py``).

The choice of path (:func:`kernels`), the FFTW plans (:func:`fftw_plans`) and
``FFT_TALLY`` live in :mod:`~daskptycho.physics.dispatch`, below the NumPy models that
use them, and are re-exported here; this module adds :func:`warm_up`, which runs the
multislice model.
"""

from __future__ import annotations

import numpy as np

from . import multislice
from .dispatch import FFT_TALLY, KERNELS, fftw_plans, kernels

__all__ = ["KERNELS", "FFT_TALLY", "kernels", "fftw_plans", "warm_up"]


def warm_up():
    """Load the compiled kernels the engines call, by one gradient call on a tiny problem.

    The gradient runs on 8 x 8 windows over 2 slices: the machine code is cached per
    argument type, not size, so a worker pays Numba's fixed memory (~135 MB) and, on a
    machine's first run, the compilation (~10 s) here, before it holds any data. A
    no-op on the NumPy path.
    """
    if kernels() is None:
        return
    obj = np.ones((2, 12, 12), np.complex64)
    probe = np.ones((1, 8, 8), np.complex64)
    win = multislice.windows(np.zeros((1, 2), np.int64), (8, 8), (12, 12))
    multislice.gradients(obj, probe, win, np.ones((8, 8), np.complex64), np.ones((1, 8, 8), np.float32),
                         rows=np.zeros(1, np.int64))
