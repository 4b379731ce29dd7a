"""Squared moduli of complex waves, in the waves' real precision.

Shared by :mod:`~daskptycho.physics.cost` (model intensities) and
:mod:`~daskptycho.physics.multislice` (far-field intensities, illumination). Every
function takes the array module ``xp`` (NumPy or CuPy) of its input.
"""

from __future__ import annotations

__all__ = ["abs2", "abs2_modes"]


def abs2(a, xp):
    """``|a|^2`` in ``a``'s real precision.

    Parameters
    ----------
    a : complex array
    xp : module
        The array module of ``a`` (NumPy or CuPy).

    Returns
    -------
    real array
        A new array of ``a``'s shape.
    """
    out = xp.multiply(a.real, a.real)
    out += xp.multiply(a.imag, a.imag)
    return out


def abs2_modes(a, xp, out=None, scratch=None):
    """``sum_k |a[:, k]|^2`` of a (J, K, N_y, N_x) complex array: (J, N_y, N_x) real.

    Two passes instead of three: the interleaved (re, im) pairs squared in one contiguous
    multiply (into ``scratch``, an array of ``a``'s shape and dtype, or a new one), then
    the pairs added.

    Parameters
    ----------
    a : complex array (J, K, N_y, N_x)
    xp : module
        The array module of ``a`` (NumPy or CuPy).
    out : real array (J, N_y, N_x), optional
        Receives the result.
    scratch : complex array like ``a``, optional
        Work space for the squares (overwritten).

    Returns
    -------
    real array (J, N_y, N_x)
        ``out`` when given, else a new array.
    """
    real = a.real.dtype
    j, k, ny, nx = a.shape
    if not a.flags.c_contiguous:
        res = abs2(a, xp)
        res = res[:, 0] if k == 1 else res.sum(axis=1)
        if out is None:
            return res
        out[...] = res
        return out
    if out is None:
        out = xp.empty((j, ny, nx), dtype=real)
    if scratch is None:
        scratch = xp.empty(a.shape, dtype=a.dtype)
    flat = a.view(real)  # (J, K, N_y, 2 N_x): re, im, re, im, ...
    sq = xp.multiply(flat, flat, out=scratch.view(real))
    xp.add(sq[:, 0, :, 0::2], sq[:, 0, :, 1::2], out=out)
    for m in range(1, k):
        out += sq[:, m, :, 0::2]
        out += sq[:, m, :, 1::2]
    return out
