"""Angular-spectrum Fresnel propagation between slices."""

from __future__ import annotations

import numpy as np

from ..backend import fft2, get_array_module, ifft2

__all__ = ["fresnel_kernel", "propagate", "spatial_frequencies"]


def spatial_frequencies(shape, pixel_size_m, xp=np):
    """Spatial frequencies (1/m) of an FFT grid, in FFT order.

    Returns
    -------
    ky, kx : arrays, shapes (ny, 1) and (1, nx)
    """
    ny, nx = shape
    ky = xp.fft.fftfreq(ny, d=pixel_size_m)[:, None]
    kx = xp.fft.fftfreq(nx, d=pixel_size_m)[None, :]
    return ky, kx


def fresnel_kernel(shape, pixel_size_m, wavelength_m, distance_m, xp=np, dtype=np.complex64):
    """Fresnel (paraxial angular-spectrum) transfer function, FFT order.

    ``H(k) = exp(-i pi lambda dz |k|^2)``: a pure phase, so propagation is unitary
    and ``H(dz1) H(dz2) = H(dz1 + dz2)``. Positive ``distance_m`` propagates
    downstream (along the beam).

    Parameters
    ----------
    shape : (int, int)
        Grid shape (ny, nx) in pixels.
    pixel_size_m, wavelength_m, distance_m : float
        Real-space pixel size, wavelength and propagation distance, in metres.

    Returns
    -------
    array, shape (ny, nx), complex
    """
    ky, kx = spatial_frequencies(shape, pixel_size_m, xp)
    # float64 for the phase, so large distances keep their precision before the cast
    chi = -np.pi * wavelength_m * distance_m * (ky.astype(xp.float64) ** 2 + kx.astype(xp.float64) ** 2)
    return xp.exp(1j * chi).astype(dtype)


def propagate(wave, kernel):
    """Propagate ``wave`` (..., ny, nx) by the transfer function ``kernel`` (ny, nx)."""
    xp = get_array_module(wave, kernel)
    return ifft2(fft2(wave, xp) * kernel, xp)
