"""Array-module dispatch: NumPy on the CPU, CuPy on the GPU.

Physics functions look the array module up from their inputs with
:func:`get_array_module`, so the same code runs on either. CuPy is never imported at
module import time.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from . import config


def get_array_module(*arrays):
    """Return ``cupy`` if any input is a CuPy array, else ``numpy``."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def is_gpu(xp) -> bool:
    return xp.__name__ == "cupy"


def fft2(a, xp=None):
    """Orthonormal 2-D FFT over the last two axes (scipy.fft threads on the CPU)."""
    xp = xp or get_array_module(a)
    if is_gpu(xp):
        return xp.fft.fft2(a, norm="ortho")
    return scipy.fft.fft2(a, norm="ortho", workers=config.get("fft.workers", -1), overwrite_x=False)


def ifft2(a, xp=None):
    """Orthonormal inverse 2-D FFT over the last two axes; the adjoint of :func:`fft2`."""
    xp = xp or get_array_module(a)
    if is_gpu(xp):
        return xp.fft.ifft2(a, norm="ortho")
    return scipy.fft.ifft2(a, norm="ortho", workers=config.get("fft.workers", -1), overwrite_x=False)


def scatter_add(target, flat_index, values):
    """Add ``values`` into the flattened last axes of ``target`` at ``flat_index``.

    Repeated indices accumulate (unlike ``target[idx] += v``).

    Parameters
    ----------
    target : array, shape (..., M)
        Modified in place.
    flat_index : int array, shape (K,)
        Indices into the last axis of ``target``.
    values : array, shape (..., K)
        Same leading shape as ``target``.
    """
    xp = get_array_module(target, values)
    lead = target.shape[:-1]
    m = target.shape[-1]
    if is_gpu(xp):
        import cupyx

        for i in np.ndindex(*lead):
            cupyx.scatter_add(target[i], flat_index, values[i])
        return target
    for i in np.ndindex(*lead):
        v = values[i]
        if np.iscomplexobj(target):
            target[i].real += np.bincount(flat_index, weights=v.real, minlength=m).astype(target.real.dtype)
            target[i].imag += np.bincount(flat_index, weights=v.imag, minlength=m).astype(target.real.dtype)
        else:
            target[i] += np.bincount(flat_index, weights=v, minlength=m).astype(target.dtype)
    return target


def to_numpy(a):
    """Copy an array to host memory as NumPy (no-op for NumPy input)."""
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)
