"""Angular-spectrum Fresnel propagation between slices."""

from __future__ import annotations

import numpy as np

from ..backend import fft2, get_array_module, ifft2

__all__ = ["fresnel_kernel", "detector_kernel", "propagators", "split_propagators", "propagate", "spatial_frequencies"]


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


def detector_kernel(shape, pixel_size_m, wavelength_m, distance_m, xp=np, dtype=np.complex64):
    """Near-field (Fresnel) transfer function from the exit wave to the detector, FFT order.

    The detector wave of a near-field measurement is ``IFFT(H_d FFT(exit))``, a unitary
    map of the (N_y, N_x) exit wave. Measured frames reach the model in *FFT order*
    (``numpy.fft.ifftshift`` of the stored, centred frame: the loaders treat far- and
    near-field frames alike), so ``H_d`` here is :func:`fresnel_kernel` times the phase
    ramp that shifts the detector wave the same way: ``IFFT(H_d FFT(exit)) =
    ifftshift(IFFT(H FFT(exit)))``. It stays a pure phase (unitary; the adjoint is
    ``conj(H_d)``).

    For a cone beam (focus-sample distance ``z1``, sample-detector ``z2``) the Fresnel
    scaling theorem makes this the plane-wave propagation over the effective distance
    ``z2 / M`` with the demagnified pixel ``p / M``, ``M = (z1 + z2) / z1``: pass those
    (the store's ``effective_distance_m`` and ``pixel_size_m``).

    Parameters
    ----------
    shape : (int, int)
        Frame shape (N_y, N_x), pixels.
    pixel_size_m, wavelength_m, distance_m : float
        Real-space (sample-plane) pixel, wavelength and effective propagation distance, metres.

    Returns
    -------
    array, shape (N_y, N_x), complex
    """
    ny, nx = shape
    h = fresnel_kernel(shape, pixel_size_m, wavelength_m, distance_m, xp, np.complex128)
    # ifftshift(y)[i] = y[i + N // 2]: the transform of that is the transform of y times exp(2 pi i k (N // 2) / N)
    iy = xp.arange(ny, dtype=xp.float64)[:, None] * ((ny // 2) / ny)
    ix = xp.arange(nx, dtype=xp.float64)[None, :] * ((nx // 2) / nx)
    ramp = xp.exp(2j * np.pi * ((iy + ix) % 1.0))
    return (h * ramp).astype(dtype)


def propagators(slice_kernel, detector):
    """The model's propagators as one array: ``slice_kernel`` (N_y, N_x) alone in the far
    field (``detector`` None), or stacked ``(2, N_y, N_x)`` with the near-field detector
    transfer function (:func:`detector_kernel`) as ``[1]``.

    The physics functions (:func:`~daskptycho.physics.multislice.forward`,
    :func:`~daskptycho.physics.multislice.gradients`, :func:`~daskptycho.physics.cuda.gradients`)
    take either form as their ``kernel``; one array travels unchanged through every layer
    that hands the kernel on (``xp.asarray`` included).
    """
    if detector is None:
        return slice_kernel
    xp = get_array_module(slice_kernel, detector)
    return xp.stack([xp.asarray(slice_kernel), xp.asarray(detector).astype(slice_kernel.dtype)])


def split_propagators(kernel):
    """``(slice kernel, detector transfer function or None)`` of a ``kernel`` argument
    (see :func:`propagators`): ``None`` is ``(None, None)``, an (N_y, N_x) array is the
    far-field slice kernel."""
    if kernel is None or kernel.ndim == 2:
        return kernel, None
    if kernel.ndim == 3 and kernel.shape[0] == 2:
        return kernel[0], kernel[1]
    raise ValueError(f"kernel must be (N_y, N_x) or (2, N_y, N_x) (slice and detector propagators), got {kernel.shape}")
