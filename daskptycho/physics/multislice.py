"""Multislice forward model and its hand-written adjoint, batched over positions.

Geometry: the object is a stack of complex transmission functions ``obj`` with
shape (S, H, W). Probe position ``j`` illuminates the window of ``N x N`` pixels
whose flat indices into ``obj[s]`` are ``index[j]`` (see :func:`window_index`).
The incident wave on slice 0 is the probe (K modes); after each slice but the last
it is propagated by the Fresnel kernel; the exit wave of the last slice goes to the
far field by an orthonormal FFT. Modes are mutually incoherent: intensities add.
"""

from __future__ import annotations

import numpy as np

from ..backend import fft2, get_array_module, ifft2, scatter_add
from .cost import cost_and_far_field_gradient

__all__ = ["window_index", "forward", "backward", "far_field_intensity", "gradients"]


def window_index(corners, window, object_shape, xp=np):
    """Flat indices of the probe windows in an object slice.

    Parameters
    ----------
    corners : int array (J, 2)
        Top-left pixel (row, col) of each window.
    window : (int, int)
        Window shape (N_y, N_x).
    object_shape : (int, int)
        (H, W) of one object slice.

    Returns
    -------
    int array, shape (J, N_y, N_x)
    """
    corners = np.asarray(corners)
    h, w = object_shape
    ny, nx = window
    if corners.size and (corners.min() < 0 or (corners[:, 0] + ny).max() > h or (corners[:, 1] + nx).max() > w):
        raise ValueError("a probe window falls outside the object array")
    rows = corners[:, 0, None, None] + np.arange(ny)[None, :, None]
    cols = corners[:, 1, None, None] + np.arange(nx)[None, None, :]
    return xp.asarray((rows * w + cols).astype(np.int64))


def _views(obj, index):
    """Object patches under each window: (S, J, N, N)."""
    s = obj.shape[0]
    return obj.reshape(s, -1)[:, index]


def forward(obj, probe, index, kernel, keep=False):
    """Far-field waves of every position and probe mode.

    Parameters
    ----------
    obj : complex array (S, H, W)
    probe : complex array (K, N, N)
    index : int array (J, N, N), from :func:`window_index`
    kernel : complex array (N, N) or None
        Fresnel transfer function between consecutive slices (FFT order).
    keep : bool
        Also return what :func:`gradients` needs (incident waves and patches).

    Returns
    -------
    far : complex array (J, K, N, N), FFT order (zero frequency at [0, 0])
    """
    xp = get_array_module(obj, probe)
    patches = _views(obj, index)[:, :, None]  # (S, J, 1, N, N)
    psi = xp.broadcast_to(probe[None], (index.shape[0],) + probe.shape)
    incident = []
    n_slices = obj.shape[0]
    for s in range(n_slices):  # loop over slices, vectorised over positions and modes
        incident.append(psi)
        phi = psi * patches[s]
        if s < n_slices - 1:
            psi = ifft2(fft2(phi, xp) * kernel, xp)
    far = fft2(phi, xp)
    if keep:
        return far, (incident, patches)
    return far


def far_field_intensity(obj, probe, index, kernel):
    """Model diffraction intensity (J, N, N), summed over modes, **centred**
    (zero frequency at ``(N // 2, N // 2)``), as stored in a dataset."""
    xp = get_array_module(obj, probe)
    far = forward(obj, probe, index, kernel)
    inten = xp.sum(far.real**2 + far.imag**2, axis=1)
    return xp.fft.fftshift(inten, axes=(-2, -1))


def backward(g_far, cache, index, obj_shape, kernel, probe_gradient=True, out=None):
    """Adjoint of the multislice model, applied to a far-field gradient.

    Given ``g = 2 dL/dPsi*`` for the far-field waves Psi of :func:`forward`,
    return ``2 dL/dO*`` for every slice and ``2 dL/dP*`` for the probe: the
    Jacobian's conjugate transpose applied to ``g``, written by hand.

    Parameters
    ----------
    g_far : complex array (J, K, N, N), FFT order
    cache : the second output of ``forward(..., keep=True)``
    index : int array (J, N, N)
    obj_shape : (S, H, W)
    kernel : complex array (N, N) or None
    out : dict, optional
        Accumulators to add into (``object``, ``illumination`` of shape (S, H, W)
        and, with ``probe_gradient``, ``probe``, ``probe_illumination``), so a sum
        over many batches allocates the object-sized arrays once.

    Returns
    -------
    dict with ``object`` (S, H, W), ``illumination`` (S, H, W) real (``sum_j sum_k
    |incident wave|^2``), and if ``probe_gradient``: ``probe`` (K, N, N) and
    ``probe_illumination`` (N, N) real (``sum_j |O_0 patch|^2``). With ``out``,
    these are ``out``'s arrays, added into.
    """
    incident, patches = cache
    xp = get_array_module(g_far)
    g = ifft2(g_far, xp)  # adjoint of the orthonormal FFT
    n_slices = obj_shape[0]
    flat = index.reshape(-1)
    if out is None:
        g_obj = xp.zeros((n_slices, obj_shape[1] * obj_shape[2]), dtype=g_far.dtype)
        illum = xp.zeros(g_obj.shape, dtype=g_far.real.dtype)
    else:
        g_obj = out["object"].reshape(n_slices, -1)
        illum = out["illumination"].reshape(n_slices, -1)
    for s in range(n_slices - 1, -1, -1):
        psi = incident[s]
        go = xp.sum(psi.conj() * g, axis=1)  # (J, N, N): sum over modes
        il = xp.sum(psi.real**2 + psi.imag**2, axis=1)
        scatter_add(g_obj[s:s + 1], flat, go.reshape(1, -1))
        scatter_add(illum[s:s + 1], flat, il.reshape(1, -1))
        g = patches[s].conj() * g  # gradient w.r.t. the incident wave
        if s > 0:
            g = ifft2(fft2(g, xp) * kernel.conj(), xp)
    result = {"object": g_obj.reshape(obj_shape), "illumination": illum.reshape(obj_shape)}
    if probe_gradient:
        p0 = patches[0][:, 0]
        gp = xp.sum(g, axis=0)
        pil = xp.sum(p0.real**2 + p0.imag**2, axis=0)
        if out is not None:
            out["probe"] += gp
            out["probe_illumination"] += pil
            gp, pil = out["probe"], out["probe_illumination"]
        result["probe"] = gp
        result["probe_illumination"] = pil
    return result


def gradients(obj, probe, index, kernel, intensity, mask=None, cost="amplitude", probe_gradient=True, out=None):
    """Cost, gradients and illumination for one batch of positions.

    Parameters
    ----------
    obj : complex array (S, H, W)
    probe : complex array (K, N, N)
    index : int array (J, N, N)
    kernel : complex array (N, N) or None
    intensity : real array (J, N, N), measured, **FFT order** (ifftshifted)
    mask : bool array (N, N) or None, FFT order
    cost : "amplitude" or "poisson"
    out : dict, optional: accumulators (see :func:`backward`)

    Returns
    -------
    dict: ``cost`` (float) and the entries of :func:`backward`.
    """
    far, cache = forward(obj, probe, index, kernel, keep=True)
    value, g = cost_and_far_field_gradient(far, intensity, mask, cost)
    result = backward(g, cache, index, obj.shape, kernel, probe_gradient, out)
    result["cost"] = value
    return result
