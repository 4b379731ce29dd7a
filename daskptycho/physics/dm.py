"""The multi-mode difference map (Dong et al., eqs. 1-7), on batches of views.

Views ``psi`` have shape (J, K, L, N, N): position j, probe mode k, object mode l.
The object modes ``obj`` have shape (L, H, W) (one slice: the method is 2-D), the
probe modes ``probe`` (K, N, N). ``index`` (J, N, N) holds the flat object indices
of each window (:func:`daskptycho.physics.window_index`).
"""

from __future__ import annotations

from ..backend import fft2, get_array_module, ifft2, scatter_add

__all__ = ["exit_waves", "fourier_constraint", "dm_update_views", "raar_update_views", "update_views", "VIEW_UPDATES",
           "overlap_projection", "dm_probe_sums", "dm_object_sums", "dm_partial_sums", "fourier_error", "relative_change"]


def exit_waves(probe, obj, index):
    """``P^(k)(r - r_j) O^(l)(r)`` for every view (eq. 2): (J, K, L, N, N)."""
    patches = obj.reshape(obj.shape[0], -1)[:, index]  # (L, J, N, N)
    return probe[None, :, None] * patches.transpose(1, 0, 2, 3)[:, None]


def fourier_constraint(waves, intensity, mask=None):
    """The constrained Fourier projection of eq. 4, back in real space.

    The far-field modulus summed over all modes is replaced by the measured one;
    phases and the split between modes are kept. Pixels outside ``mask`` keep the
    computed values.

    Parameters
    ----------
    waves : (J, K, L, N, N) complex
    intensity : (J, N, N) real, FFT order
    mask : (N, N) bool, FFT order, optional
    """
    xp = get_array_module(waves)
    far = fft2(waves, xp)
    total = xp.sum(far.real**2 + far.imag**2, axis=(1, 2))
    scale = xp.sqrt(intensity / xp.maximum(total, 1e-30)).astype(far.real.dtype)
    if mask is not None:
        scale = xp.where(mask, scale, xp.ones_like(scale))
    return ifft2(far * scale[:, None, None], xp)


def dm_update_views(psi, probe, obj, index, intensity, mask=None, beta=0.8):
    """Eq. 3: ``psi += beta (F^-1 F_c[2 P O - psi] - P O)``; returns the new views."""
    po = exit_waves(probe, obj, index)
    return psi + beta * (fourier_constraint(2 * po - psi, intensity, mask) - po)


def raar_update_views(psi, probe, obj, index, intensity, mask=None, beta=0.8):
    """Relaxed averaged alternating reflections (Luke 2005) on the views; returns the new views.

    With ``P_O psi = P O`` (the overlap projection: the probe and object fitted to the
    views, eqs. 5 and 6), ``P_F`` the Fourier projection of eq. 4 and ``R = 2 P - I``::

        psi <- [beta/2 (R_F R_O + I) + (1 - beta) P_O] psi
             = psi + beta (P_F[2 P O - psi] - P O) - (1 - beta) (psi - P O)

    that is eq. 3 plus a pull of the views towards ``P O`` by ``1 - beta``: the
    relaxation goes with the projection applied first, as in Luke's
    ``[beta/2 (R_S R_M + I) + (1 - beta) P_M]``. At ``beta = 1`` it is eq. 3 with
    ``beta = 1``. On noisy data there is no view both sets hold; eq. 3 then keeps moving
    the views away from ``P O``, while the pull keeps them near it (measured in
    ``docs/difference-map.md``). Same transforms as eq. 3: one pair per view.

    Parameters
    ----------
    psi : (J, K, L, N, N) complex
        The views.
    probe : (K, N, N) complex
    obj : (L, H, W) complex
    index : (J, N, N) int
        Flat object indices of each window.
    intensity : (J, N, N) real
        Measured counts, FFT order.
    mask : (N, N) bool, FFT order, optional
    beta : float
        0 < beta <= 1.
    """
    po = exit_waves(probe, obj, index)
    # in place: no more view-sized temporaries than eq. 3 (the chunks are sized for those)
    new = fourier_constraint(2 * po - psi, intensity, mask)
    new -= po
    new *= beta
    new += psi
    pull = psi - po
    pull *= 1 - beta
    new -= pull
    return new


#: the view updates of engine ``dm``, by the name its ``view_update`` option takes
VIEW_UPDATES = {"dm": dm_update_views, "raar": raar_update_views}


def update_views(psi, probe, obj, index, intensity, mask=None, beta=0.8, kind="dm"):
    """The view update ``kind`` (a key of :data:`VIEW_UPDATES`): eq. 3 (``"dm"``) or
    :func:`raar_update_views` (``"raar"``); returns the new views (J, K, L, N, N)."""
    return VIEW_UPDATES[kind](psi, probe, obj, index, intensity, mask, beta)


def overlap_projection(psi, probe, index, obj_shape):
    """``P_O psi`` for a fixed probe: the object of eq. 6 (no floor) fitted to the views,
    then its exit waves (eq. 2). An orthogonal projection onto the views of the form
    ``P O``; object pixels no window touches are zero.

    Parameters
    ----------
    psi : (J, K, L, N, N) complex
    probe : (K, N, N) complex
    index : (J, N, N) int
    obj_shape : (L, H, W)

    Returns
    -------
    views : (J, K, L, N, N) complex128
    obj : (L, H, W) complex128
        The fitted object.
    """
    xp = get_array_module(psi)
    s = dm_object_sums(psi, probe, index, obj_shape)
    den = s["object_den"]
    obj = xp.where(den > 0, s["object_num"] / xp.where(den > 0, den, 1.0), 0)
    return exit_waves(probe.astype(xp.complex128), obj, index), obj


def dm_probe_sums(psi, obj, index):
    """This part's numerator (K, N, N) and denominator (N, N) of eq. 5 (probe).

    Sums over the part's views: adding the dicts of all parts gives the full sums.
    """
    xp = get_array_module(psi)
    patches = obj.reshape(obj.shape[0], -1)[:, index].transpose(1, 0, 2, 3)  # (J, L, N, N)
    # float64 sums: the result must not depend on how positions are split into parts
    return {"probe_num": xp.sum(patches.conj()[:, None] * psi, axis=(0, 2), dtype=xp.complex128),
            "probe_den": xp.sum(patches.real**2 + patches.imag**2, axis=(0, 1), dtype=xp.float64)}


def dm_object_sums(psi, probe, index, obj_shape, out=None):
    """This part's numerator (L, H, W) and denominator (H, W) of eq. 6 (object),
    on an object array of shape ``obj_shape`` (L, H, W), in float64 (so the sums do
    not depend on how the positions are split into parts or chunks); with ``out``,
    added into its ``object_num`` and ``object_den``."""
    xp = get_array_module(psi)
    n_obj = obj_shape[0]
    flat = index.reshape(-1)
    h, w = obj_shape[1], obj_shape[2]
    if out is not None:
        obj_num = out["object_num"].reshape(n_obj, -1)
        obj_den = out["object_den"].reshape(1, -1)
    else:
        obj_num = xp.zeros((n_obj, h * w), dtype=xp.complex128)
        obj_den = xp.zeros((1, h * w), dtype=xp.float64)
    contrib = xp.sum(probe.conj()[None, :, None] * psi, axis=1)  # (J, L, N, N)
    scatter_add(obj_num, flat, contrib.transpose(1, 0, 2, 3).reshape(n_obj, -1))
    p2 = xp.sum(probe.real**2 + probe.imag**2, axis=0)  # (N, N)
    scatter_add(obj_den, flat, xp.broadcast_to(p2, index.shape).reshape(1, -1))
    return {"object_num": obj_num.reshape(obj_shape), "object_den": obj_den.reshape(obj_shape[1:])}


def dm_partial_sums(psi, probe, obj, index):
    """Both sums (eqs. 5 and 6) from the same probe and object (for tests and
    single-process use; the engine updates the object first, then the probe)."""
    return {**dm_probe_sums(psi, obj, index), **dm_object_sums(psi, probe, index, obj.shape)}


def fourier_error(probe, obj, index, intensity, mask=None):
    """``sum (sqrt(sum_kl |F[P O]|^2) - sqrt(I))^2`` over the views (a float)."""
    xp = get_array_module(probe)
    far = fft2(exit_waves(probe, obj, index), xp)
    amp = xp.sqrt(xp.sum(far.real**2 + far.imag**2, axis=(1, 2)))
    r = (amp - xp.sqrt(intensity)) ** 2
    if mask is not None:
        r = r * mask
    return float(xp.sum(r, dtype=xp.float64))


def relative_change(new, old, axis=None):
    """Eq. 7: ``sqrt(sum |new - old|^2 / sum |new|^2)`` over ``axis`` (all by default)."""
    xp = get_array_module(new)
    d = xp.sum(xp.abs(new - old) ** 2, axis=axis)
    n = xp.sum(xp.abs(new) ** 2, axis=axis)
    return xp.sqrt(d / xp.maximum(n, 1e-30))
