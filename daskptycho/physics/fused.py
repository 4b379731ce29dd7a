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
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

from .. import config

__all__ = ["KERNELS", "kernels", "fftw_plans", "warm_up"]

KERNELS = ("auto", "numba", "numpy")

_compiled = None  # the _compiled module once Numba imported; False when it is missing
_lock = threading.Lock()


def _setting():
    import dask.config

    try:
        name = dask.config.config["daskptycho"]["kernels"]
    except (KeyError, TypeError):
        name = config.get("kernels", "auto")
    name = name or "auto"
    if name not in KERNELS:
        from ..errors import OptionsError

        raise OptionsError("kernels", f"is {name!r}; use one of {', '.join(KERNELS)} (daskptycho.yaml or DASK_DASKPTYCHO__KERNELS)")
    return name


def kernels():
    """The compiled kernels (a module) to use on NumPy arrays, or ``None`` for the NumPy
    path (``daskptycho.kernels`` is ``numpy``, or Numba is not installed)."""
    global _compiled
    name = _setting()
    if name == "numpy":
        return None
    if _compiled is None:
        with _lock:
            if _compiled is None:
                try:
                    from . import _compiled as module
                except ImportError:
                    module = False
                _compiled = module
    if _compiled is False:
        if name == "numba":
            warnings.warn("daskptycho.kernels is 'numba' but Numba is not installed (pip install 'daskptycho[fast]'); "
                          "using the NumPy path", RuntimeWarning, stacklevel=2)
        return None
    return _compiled


# 2-D FFTs computed inside compiled kernels (they bypass daskptycho.backend.fft2/ifft2),
# for benchmarks and tests that count an iteration's FFTs
FFT_TALLY = {"calls": 0, "ffts": 0, "by_size": {}}  # by_size: {N_x: count}

_FFTW_FORWARD, _FFTW_BACKWARD = -1, 1
_FFTW_FLAGS = {"FFTW_MEASURE": 0, "FFTW_PATIENT": 1 << 5, "FFTW_ESTIMATE": 1 << 6}
_FFTW_WISDOM_ONLY = 1 << 21
_plans = {}


def _fftw_lib(compiled):
    import ctypes

    lib = ctypes.CDLL(compiled.FFTWF_LIBRARY)
    f = lib.fftwf_plan_many_dft
    f.restype = ctypes.c_void_p
    c_int, ptr = ctypes.c_int, ctypes.c_void_p
    f.argtypes = [c_int, ctypes.POINTER(c_int), c_int, ptr, ptr, c_int, c_int, ptr, ptr, c_int, c_int, c_int, ctypes.c_uint]
    return lib


def fftw_plans(shape):
    """In-place single-precision FFTW plans (forward, backward) for waves of ``shape``
    (K, N_y, N_x), as integers for :func:`_compiled.position_gradients`, or ``None``
    when that path is not available (no Numba or pyFFTW, another FFT backend chosen,
    or FFTW has no plan from the shared wisdom).

    The plans are the ones :mod:`daskptycho.backend` would use for the same transform:
    planned there first (``FFTW_MEASURE`` through the machine-wide wisdom file, see
    ``daskptycho.fft.planner``), then made here from that wisdom only, so every process
    computes the same bits. Cached for the life of the process (FFTW's new-array execute
    is thread-safe; planning is serialised by the backend's lock).
    """
    from .. import backend

    compiled = kernels()
    if compiled is None or compiled.FFTWF_LIBRARY is None or backend.fft_backend() != "pyfftw":
        return None
    backend.tune_allocator(1, 2)  # FFTW's scratch in execute comes from the heap (see tune_allocator)
    flag = backend._planner_flag()
    key = (tuple(shape), flag)
    if key in _plans:
        return _plans[key]
    import ctypes

    k, ny, nx = shape
    plans = []
    for forward in (True, False):
        backend._plan(tuple(shape), np.dtype(np.complex64), forward, True, 1)  # measured (or read) into the wisdom
        with backend._wisdom_lock:
            lib = _fftw_lib(compiled)
            if compiled.FFTWF_THREADS_LIBRARY is not None:  # wisdom is per thread count: the backend plans these with 1
                ctypes.CDLL(compiled.FFTWF_THREADS_LIBRARY).fftwf_plan_with_nthreads(ctypes.c_int(1))
            buf = backend.empty(tuple(shape), np.complex64)
            dims = (ctypes.c_int * 2)(ny, nx)
            bits = _FFTW_FLAGS[flag] | (0 if flag == "FFTW_ESTIMATE" else _FFTW_WISDOM_ONLY)
            plan = lib.fftwf_plan_many_dft(2, dims, k, buf.ctypes.data, None, 1, ny * nx, buf.ctypes.data, None, 1, ny * nx,
                                           _FFTW_FORWARD if forward else _FFTW_BACKWARD, bits)
        if not plan:
            _plans[key] = None
            return None
        plans.append(int(plan))
    _plans[key] = tuple(plans)
    return _plans[key]


def warm_up():
    """Load the compiled kernels the engines call, by one gradient call on a tiny problem
    (8 x 8 windows, 2 slices): the machine code is cached per argument type, not size, so
    a worker pays Numba's fixed memory (~135 MB) and, on a machine's first run, the
    compilation (~10 s) here, before it holds any data. A no-op on the NumPy path."""
    if kernels() is None:
        return
    from . import multislice

    obj = np.ones((2, 12, 12), np.complex64)
    probe = np.ones((1, 8, 8), np.complex64)
    win = multislice.windows(np.zeros((1, 2), np.int64), (8, 8), (12, 12))
    multislice.gradients(obj, probe, win, np.ones((8, 8), np.complex64), np.ones((1, 8, 8), np.float32),
                         rows=np.zeros(1, np.int64))
