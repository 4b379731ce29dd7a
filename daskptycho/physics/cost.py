"""Cost functions on far-field waves and their gradients with respect to the waves.

Gradient convention (used everywhere in daskptycho): for a real cost ``L`` of a
complex array ``z`` the gradient is ``g = 2 dL/dz*`` (Wirtinger), so that to first
order ``L(z + dz) - L(z) = Re(sum(conj(g) dz))`` and steepest descent is
``z -= step * g``.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .dispatch import kernels
from .intensity import abs2_modes

__all__ = ["amplitude_cost", "poisson_cost", "cost_and_far_field_gradient"]

_TINY = 1e-30


def _model_intensity(far):
    """``sum_k |far[..., k, :, :]|^2`` in far's real precision (a new array)."""
    xp = get_array_module(far)
    if far.ndim != 4:
        return xp.sum(far.real**2 + far.imag**2, axis=-3)  # sum over probe modes
    return abs2_modes(far, xp)


def amplitude_cost(far, intensity, mask=None):
    """Amplitude cost of the paper (eq. 1) summed over positions.

    ``L = sum_j sum_q m_q (sqrt(sum_k |Psi_jkq|^2) - sqrt(I_jq))^2``

    Parameters
    ----------
    far : array (J, K, ny, nx), complex
        Far-field waves for J positions and K probe modes (FFT order).
    intensity : array (J, ny, nx), real
        Measured intensities (same order as ``far``).
    mask : array (ny, nx) bool or None
        Valid detector pixels.
    """
    xp = get_array_module(far)
    r = xp.sqrt(_model_intensity(far)) - xp.sqrt(intensity)
    r = r * r
    if mask is not None:
        r = r * mask
    return float(xp.sum(r, dtype=xp.float64))


def poisson_cost(far, intensity, mask=None):
    """Negative Poisson log-likelihood (up to a data-only constant).

    ``L = sum m_q (I_model - I log(I_model))``
    """
    xp = get_array_module(far)
    model = _model_intensity(far)
    r = model - intensity * xp.log(model + _TINY)
    if mask is not None:
        r = r * mask
    return float(xp.sum(r, dtype=xp.float64))


def cost_and_far_field_gradient(far, intensity, mask=None, kind="amplitude", overwrite=False, far_scale=1.0):
    """Cost and its gradient with respect to the far-field waves.

    ``overwrite=True`` lets the gradient be written into ``far`` (no new array).

    ``far_scale`` (s): the waves are ``Psi = s * far`` (``far`` from an unnormalised FFT,
    ``s = 1 / sqrt(N_y N_x)``); the gradient returned is then ``s * 2 dL/dPsi*``, which an
    *unnormalised* inverse FFT takes to the orthonormal adjoint's result. The scale is
    applied to the (J, N, N) intensities and weights, never to the waves themselves.

    Returns
    -------
    cost : float
    grad : array like ``far``
        ``2 dL/dPsi*`` (see module docstring).
    """
    xp = get_array_module(far)
    if kind not in ("amplitude", "poisson"):
        raise ValueError(f"cost must be 'amplitude' or 'poisson', got {kind!r}")
    if overwrite and xp is np and far.ndim == 4 and far.dtype.kind == "c" and far.flags.c_contiguous \
            and intensity.dtype == far.real.dtype and intensity.flags.c_contiguous:
        compiled = kernels()
        if compiled is not None:  # one pass over the waves instead of a dozen
            m = np.ones(far.shape[-2:], dtype=bool) if mask is None else np.ascontiguousarray(np.broadcast_to(mask, far.shape[-2:]), dtype=bool)
            s2 = far_scale * far_scale
            cost = compiled.cost_gradient(far, intensity, m, s2, 2 * s2, kind == "poisson")
            return float(cost), far
    real = far.real.dtype.type
    model = _model_intensity(far)  # a new (J, N, N) array, reused below as work space
    if far_scale != 1.0:
        model *= real(far_scale * far_scale)
    # in place: a handful of (J, N, N) passes and two temporaries; the scalar factors
    # (2, far_scale^2) are folded into one multiply (exact: 2 is a power of two)
    if kind == "amplitude":
        amp = xp.sqrt(model, out=model)
        r = xp.sqrt(intensity)
        r = xp.subtract(amp, r, out=r) if r.dtype == amp.dtype else amp - r
        cost_map = xp.multiply(r, r)
        if mask is not None:
            cost_map *= mask
        cost = float(xp.sum(cost_map, dtype=xp.float64))
        # d(amp)/dPsi* = Psi / (2 amp); where the model is dark its gradient is zero
        keep = amp > 0
        w = xp.divide(r, xp.maximum(amp, _TINY, out=amp), out=r)
        w *= keep
        if mask is not None:
            w *= mask
    else:  # poisson (kind checked above)
        den = model + _TINY
        if intensity.dtype == den.dtype:
            cost_map = xp.log(den)
            cost_map *= intensity
            cost_map = xp.subtract(model, cost_map, out=cost_map)
            w = xp.divide(intensity, den, out=den)
        else:
            cost_map = model - intensity * xp.log(den)
            w = intensity / den
        if mask is not None:
            cost_map = cost_map * mask
        cost = float(xp.sum(cost_map, dtype=xp.float64))
        w = xp.subtract(1, w, out=w)
        if mask is not None:
            w *= mask
    w *= 2 * far_scale * far_scale
    w = w.astype(far.real.dtype, copy=False)[:, None]
    if overwrite:
        far *= w
        return cost, far
    return cost, far * w
