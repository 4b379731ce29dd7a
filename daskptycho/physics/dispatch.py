"""Which CPU path runs the multislice hot path: the Numba-compiled kernels or NumPy.

The low half of :mod:`~daskptycho.physics.fused` (which re-exports these names and
adds :func:`~daskptycho.physics.fused.warm_up`), kept apart so that
:mod:`~daskptycho.physics.cost` and :mod:`~daskptycho.physics.multislice` can ask for
the compiled kernels without importing each other:

:func:`kernels`
    The compiled module (:mod:`daskptycho.physics._compiled`, imported on first use so
    ``import daskptycho`` never imports Numba) or ``None`` for the NumPy path, as the
    ``daskptycho.kernels`` setting says.
:func:`fftw_plans`
    The single-precision FFTW plans the per-position kernel executes.
:func:`aligned_stride`
    Whether waves of a shape keep FFTW's SIMD alignment from one position to the next.
``FFT_TALLY``
    A count of the 2-D FFTs run inside the compiled kernels (benchmarks and tests).
"""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np

from .. import backend, config
from ..errors import OptionsError

__all__ = ["KERNELS", "FFT_TALLY", "kernels", "fftw_plans", "aligned_stride"]

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
        raise OptionsError("kernels", f"is {name!r}; use one of {', '.join(KERNELS)} (daskptycho.yaml or DASK_DASKPTYCHO__KERNELS)")
    return name


def kernels():
    """The compiled kernels to use on NumPy arrays.

    Returns
    -------
    module or None
        :mod:`daskptycho.physics._compiled`, or ``None`` for the NumPy path
        (``daskptycho.kernels`` is ``numpy``, or Numba is not installed: with
        ``numba`` asked for, a :class:`RuntimeWarning` says so).

    Raises
    ------
    OptionsError
        ``daskptycho.kernels`` is not one of ``auto|numba|numpy``.
    """
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
    """Out-of-place single-precision FFTW plans (forward, backward) for waves of ``shape``.

    Out of place because FFTW's out-of-place 2-D transform of one wave is the faster
    (18.0 against 19.0 us at 96^2 px, one thread, measured side by side with pyFFTW's
    plans) and is what the FFT floor is measured with: the compiled model moves each wave
    between two scratch buffers, executing a plan on any two distinct aligned arrays of
    ``shape``.

    The plans are the ones :mod:`daskptycho.backend` would use for the same transform:
    planned there first (``FFTW_MEASURE`` through the machine-wide wisdom file, see
    ``daskptycho.fft.planner``), then made here from that wisdom only, so every process
    computes the same bits. Cached for the life of the process (FFTW's new-array execute
    is thread-safe; planning is serialised by the backend's lock).

    Parameters
    ----------
    shape : (int, int, int)
        (K, N_y, N_x) of one position's waves.

    Returns
    -------
    (int, int) or None
        The plans as integers for :func:`daskptycho.physics._compiled.position_gradients`,
        or ``None`` when that path is not available (no Numba or pyFFTW, another FFT
        backend chosen, or FFTW has no plan from the shared wisdom).
    """
    compiled = kernels()
    if compiled is None or compiled.FFTWF_LIBRARY is None or backend.fft_backend() != "pyfftw":
        return None
    backend.tune_allocator(1, 2)  # FFTW's scratch in execute comes from the heap (see tune_allocator)
    flag = backend.planner_flag()
    key = (tuple(shape), flag, "out-of-place")
    if key in _plans:
        return _plans[key]
    import ctypes

    k, ny, nx = shape
    plans = []
    for forward in (True, False):
        backend.fftw_plan(shape, np.complex64, forward, inplace=False, threads=1)  # measured (or read) into the wisdom
        with backend.wisdom_lock:
            lib = _fftw_lib(compiled)
            if compiled.FFTWF_THREADS_LIBRARY is not None:  # wisdom is per thread count: the backend plans these with 1
                ctypes.CDLL(compiled.FFTWF_THREADS_LIBRARY).fftwf_plan_with_nthreads(ctypes.c_int(1))
            src, dst = backend.empty(tuple(shape), np.complex64), backend.empty(tuple(shape), np.complex64)
            dims = (ctypes.c_int * 2)(ny, nx)
            bits = _FFTW_FLAGS[flag] | (0 if flag == "FFTW_ESTIMATE" else _FFTW_WISDOM_ONLY)
            plan = lib.fftwf_plan_many_dft(2, dims, k, src.ctypes.data, None, 1, ny * nx, dst.ctypes.data, None, 1, ny * nx,
                                           _FFTW_FORWARD if forward else _FFTW_BACKWARD, bits)
        if not plan:
            _plans[key] = None
            return None
        plans.append(int(plan))
    _plans[key] = tuple(plans)
    return _plans[key]


def aligned_stride(shape):
    """True when complex64 waves of ``shape`` (K, N_y, N_x), laid end to end, each start
    on pyFFTW's SIMD alignment (False without pyFFTW)."""
    alignment = backend.simd_alignment()
    return alignment is not None and (math.prod(int(n) for n in shape) * 8) % alignment == 0
