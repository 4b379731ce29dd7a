"""Probe formation: electron (aperture, defocus, Cs) and X-ray (defocused aperture,
zone-plate-like with a central stop), and mutually incoherent probe modes.

Sign convention for defocus (written in ``docs/format.md`` too): the aberration
phase is ``chi(k) = pi lambda |k|^2 (Cs lambda^2 |k|^2 / 2 - defocus)`` (Kirkland's
convention), so a **positive** ``defocus_m`` is underfocus: the crossover lies
downstream of the sample plane, and the probe at the sample is the converging beam
before focus.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module, ifft2, to_numpy
from .propagation import spatial_frequencies

__all__ = ["aperture_probe", "electron_probe", "xray_probe", "probe_modes", "blurred_modes", "motion_modes",
           "orthogonalize_modes", "support_half_widths", "near_field_probe", "NEAR_FIELD_PROBES"]

NEAR_FIELD_PROBES = ("backpropagated", "flat")


def aperture_probe(shape, pixel_size_m, wavelength_m, semiangle_rad, defocus_m=0.0, cs_m=0.0,
                   central_stop=0.0, xp=np, dtype=np.complex64):
    """Probe formed by a circular aperture with defocus and spherical aberration.

    Parameters
    ----------
    shape : (int, int)
        Window shape (py, px) in pixels.
    pixel_size_m, wavelength_m : float
        Real-space pixel size and wavelength, metres.
    semiangle_rad : float
        Aperture (convergence) semi-angle, radians.
    defocus_m : float
        Defocus, metres; positive is underfocus (see module docstring).
    cs_m : float
        Spherical aberration coefficient, metres.
    central_stop : float
        Radius of a central stop as a fraction of the aperture (0 = none); a
        zone-plate-like X-ray optic uses about 0.3-0.5.

    Returns
    -------
    array, shape (py, px), complex
        The probe with its centre at pixel ``(py // 2, px // 2)``, normalised to
        ``sum |P|^2 = 1``.
    """
    ky, kx = spatial_frequencies(shape, pixel_size_m, xp)
    k2 = ky**2 + kx**2
    kmax = semiangle_rad / wavelength_m
    if kmax * pixel_size_m * 2 > 1:
        raise ValueError(
            f"aperture semi-angle {semiangle_rad} rad exceeds the detector's maximum angle "
            f"{wavelength_m / (2 * pixel_size_m)} rad: use a smaller pixel_size_m"
        )
    aperture = (k2 <= kmax**2) & (k2 >= (central_stop * kmax) ** 2)
    chi = np.pi * wavelength_m * k2 * (0.5 * cs_m * wavelength_m**2 * k2 - defocus_m)
    spectrum = aperture * xp.exp(-1j * chi)
    probe = xp.fft.fftshift(ifft2(spectrum.astype(np.complex128), xp), axes=(-2, -1))
    probe /= xp.sqrt(xp.sum(xp.abs(probe) ** 2))
    return probe.astype(dtype)


def electron_probe(shape, pixel_size_m, wavelength_m, semiangle_rad, defocus_m=0.0, cs_m=0.0, **kw):
    """Convergent-beam electron probe (STEM): see :func:`aperture_probe`."""
    return aperture_probe(shape, pixel_size_m, wavelength_m, semiangle_rad, defocus_m, cs_m, **kw)


def xray_probe(shape, pixel_size_m, wavelength_m, semiangle_rad, defocus_m, central_stop=0.0, **kw):
    """X-ray probe of a focusing optic of numerical aperture ``semiangle_rad``,
    ``defocus_m`` away from focus; ``central_stop > 0`` gives a zone-plate-like
    annular pupil."""
    return aperture_probe(shape, pixel_size_m, wavelength_m, semiangle_rad, defocus_m, 0.0,
                          central_stop=central_stop, **kw)


def orthogonalize_modes(modes):
    """Orthogonalize probe modes (K, py, px), keeping their total power.

    The modes are replaced by the eigenvectors of their density matrix
    ``sum_k |P_k><P_k|``, sorted by decreasing power. Incoherent modes describe
    the same partially coherent beam under any unitary mixing, so this changes
    no intensity the model predicts.

    Returns
    -------
    modes : array (K, py, px)
    fractions : array (K,), float
        Power fraction of each mode, summing to 1.
    """
    new, fractions, _ = orthogonalize_modes_with_mixing(modes)
    return new, fractions


def orthogonalize_modes_with_mixing(modes):
    """:func:`orthogonalize_modes`, also returning the mixing matrix ``U`` (K, K)
    with ``new[k] = sum_m U[m, k] modes[m]``, to apply the same change to views."""
    xp = get_array_module(modes)
    k = modes.shape[0]
    flat = modes.reshape(k, -1).astype(np.complex128)
    # with G[i, j] = <a_i, a_j> and new_k = sum_m V[m, k] a_m, <new_k, new_k'> is
    # (V^H G V)[k, k']: diagonal when V holds the eigenvectors of G
    gram = flat.conj() @ flat.T
    w, v = xp.linalg.eigh(gram)
    order = xp.argsort(w)[::-1]
    v = v[:, order]
    new = (v.T @ flat).reshape(modes.shape).astype(modes.dtype)
    power = xp.sum(xp.abs(new.reshape(k, -1)) ** 2, axis=1)
    return new, (power / power.sum()).astype(np.float64), v


def probe_modes(probe, n_modes, first_fraction=0.7, decay=0.5, seed=0):
    """Build ``n_modes`` mutually incoherent modes from one coherent probe.

    The extra modes are the probe multiplied by low-order Hermite-like polynomials
    (``y``, ``x``, ``xy``, ``y^2 - x^2`` ...) and orthogonalised: a smooth first
    guess of a partially coherent beam. Power fractions: ``first_fraction`` for
    the main mode, the rest shared in a geometric series of ratio ``decay``.

    Parameters
    ----------
    probe : array (py, px) or (1, py, px)
    n_modes : int

    Returns
    -------
    array, shape (n_modes, py, px), same total power as ``probe``
    """
    xp = get_array_module(probe)
    p = probe.reshape(probe.shape[-2:])
    total = float(xp.sum(xp.abs(p) ** 2))
    if n_modes == 1:
        return p[None].copy()
    py, px = p.shape
    y = (xp.arange(py) - py // 2)[:, None] / py
    x = (xp.arange(px) - px // 2)[None, :] / px
    basis = [xp.ones_like(y * x), y + 0 * x, x + 0 * y, x * y, y**2 - x**2, y**2 + x**2]
    rng = np.random.default_rng(seed)
    modes = []
    for i in range(n_modes):
        if i < len(basis):
            f = basis[i]
        else:
            f = xp.asarray(rng.standard_normal((py, px)))
        modes.append(p * f)
    modes = xp.stack(modes)
    return _orthonormal_with_fractions(modes, total, first_fraction, decay).astype(probe.dtype)


def _orthonormal_with_fractions(modes, total, first_fraction, decay):
    """Gram-Schmidt the modes (K, py, px) in order (mode 0 keeps its shape), then give
    them powers ``first_fraction`` and a geometric series of ratio ``decay`` of ``total``."""
    xp = get_array_module(modes)
    k = modes.shape[0]
    flat = modes.reshape(k, -1).astype(np.complex128)
    for i in range(k):
        for j in range(i):
            flat[i] -= (flat[j].conj() @ flat[i]) * flat[j]
        flat[i] /= xp.sqrt(xp.sum(xp.abs(flat[i]) ** 2))
    rest = decay ** np.arange(k - 1)
    fractions = np.concatenate([[first_fraction], (1 - first_fraction) * rest / rest.sum()])
    flat *= xp.asarray(np.sqrt(fractions * total))[:, None]
    return flat.reshape(modes.shape)


def blurred_modes(probe, n_modes, first_fraction=0.8, decay=0.5):
    """``n_modes`` incoherent modes that differ in blur, as the multi-mode DM paper
    suggests for fly scans: mode k is the probe blurred by a Gaussian of
    ``k`` pixels, orthogonalised; power fractions ``first_fraction`` then a
    geometric series of ratio ``decay``. Same total power as ``probe``.

    Returns
    -------
    array (n_modes, py, px)
    """
    from scipy import ndimage

    xp = get_array_module(probe)
    p = to_numpy(probe).reshape(probe.shape[-2:]).astype(np.complex128)
    total = float(np.sum(np.abs(p) ** 2))
    if n_modes == 1:
        return xp.asarray(p[None].astype(probe.dtype))
    modes = [p] + [ndimage.gaussian_filter(p.real, k) + 1j * ndimage.gaussian_filter(p.imag, k) for k in range(1, n_modes)]
    return xp.asarray(_orthonormal_with_fractions(np.stack(modes), total, first_fraction, decay).astype(probe.dtype))


def motion_modes(probe, n_modes, length_px, axis=-1, samples=None):
    """Modes of a probe that moves uniformly over ``length_px`` pixels along ``axis``
    during each exposure (a fly scan): the principal components of the motion-blurred,
    partially coherent beam, i.e. modes that differ in blur along the motion.

    The beam is the incoherent mean of the probe shifted (in Fourier space, so
    sub-pixel lengths work) to ``samples`` points across the motion; its leading
    ``n_modes`` eigenmodes carry their natural power fractions, rescaled to the
    probe's total power.

    Returns
    -------
    array (n_modes, py, px)
    """
    xp = get_array_module(probe)
    p = to_numpy(probe).reshape(probe.shape[-2:]).astype(np.complex128)
    total = float(np.sum(np.abs(p) ** 2))
    if n_modes == 1 or length_px <= 0:
        return probe_modes(xp.asarray(p.astype(probe.dtype)), n_modes)
    samples = samples or max(2 * n_modes + 1, int(np.ceil(length_px)) + 1)
    offsets = np.linspace(-length_px / 2, length_px / 2, samples)
    freq = np.fft.fftfreq(p.shape[axis])
    freq = freq[None, :] if axis in (-1, 1) else freq[:, None]
    spectrum = np.fft.fft2(p)
    shifted = np.stack([np.fft.ifft2(spectrum * np.exp(-2j * np.pi * freq * o)) for o in offsets]) / np.sqrt(samples)
    modes, _ = orthogonalize_modes(shifted)
    modes = modes[:n_modes]
    modes *= np.sqrt(total / np.sum(np.abs(modes) ** 2))
    return xp.asarray(modes.astype(probe.dtype))


def support_half_widths(probe, fraction=0.999):
    """Half-widths (pixels) about the window's centre pixel that hold ``fraction`` of the
    probe's intensity along each axis: the probe's support, for sizing tile halos.

    Along y, the smallest ``r`` such that the rows ``N_y // 2 - r .. N_y // 2 + r`` hold
    ``fraction`` of ``sum_k |P_k|^2``; the same along x. (A position belongs to the tile
    whose core holds its window's centre pixel, so a halo of these widths holds that
    share of every one of the tile's probes.)

    Parameters
    ----------
    probe : complex array (K, N_y, N_x) or (N_y, N_x)
    fraction : float in (0, 1]

    Returns
    -------
    (int, int)
        ``(r_y, r_x)``, each at most the window's reach from its centre.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    p = to_numpy(probe)
    inten = (p.real.astype(np.float64) ** 2 + p.imag.astype(np.float64) ** 2).reshape((-1,) + p.shape[-2:]).sum(axis=0)
    total = inten.sum()
    out = []
    for axis in (0, 1):
        marginal = inten.sum(axis=1 - axis)
        n = marginal.size
        c = n // 2
        reach = max(c, n - 1 - c)
        r = reach
        if total > 0:
            for r in range(reach + 1):
                if marginal[max(0, c - r):c + r + 1].sum() >= fraction * total * (1 - 1e-12):
                    break
        out.append(int(r))
    return tuple(out)


def near_field_probe(mean_frame, detector, mask=None, kind="backpropagated"):
    """An initial probe for near-field (Fresnel) ptychography, from the measured frames.

    A far-field probe guess (an aperture's focus) says nothing about a near-field
    illumination, which fills the window. Two guesses:

    ``"backpropagated"``
        The mean measured amplitude ``sqrt(mean_j I_j)`` taken as the detector wave (zero
        phase) and propagated back to the sample plane by the adjoint of the detector
        propagation, ``IFFT(conj(H_d) FFT(.))``. Averaged over the scan the object's
        holograms wash out, so this is close to the empty-beam hologram: its bright and
        dark regions (the beam's extent, the optics' stripes) are in the right places,
        its phase is only the propagation's.
    ``"flat"``
        A uniform amplitude: the empty beam of an ideal plane wave.

    Either needs probe refinement (``refine_probe``); the reconstruction engines turn it
    on for near-field stores without a stored probe (see ``docs/near-field.md``).

    Parameters
    ----------
    mean_frame : real array (N_y, N_x)
        The mean measured frame, **FFT order** (``numpy.fft.ifftshift`` of the stored,
        centred frame), counts.
    detector : complex array (N_y, N_x)
        The detector transfer function, FFT order
        (:func:`~daskptycho.physics.propagation.detector_kernel`).
    mask : bool array (N_y, N_x) or None
        Valid pixels, FFT order; invalid ones take the mean of the valid ones.
    kind : {"backpropagated", "flat"}

    Returns
    -------
    complex64 array (N_y, N_x)
        Centred on the window (real space, natural order), with ``sum |P|^2`` the mean
        total counts of a frame (the model's unitary propagation keeps that power).
    """
    if kind not in NEAR_FIELD_PROBES:
        raise ValueError(f"kind must be one of {NEAR_FIELD_PROBES}, got {kind!r}")
    xp = get_array_module(mean_frame, detector)
    frame = xp.maximum(xp.asarray(mean_frame, dtype=xp.float64), 0)
    if mask is not None:
        good = xp.asarray(mask, dtype=bool)
        frame = xp.where(good, frame, frame[good].mean() if bool(good.any()) else 0.0)
    power = float(frame.sum())
    if kind == "flat":
        probe = xp.ones(frame.shape, dtype=xp.complex128)
    else:
        amplitude = xp.sqrt(frame).astype(xp.complex128)
        probe = xp.fft.ifft2(xp.fft.fft2(amplitude) * xp.conj(xp.asarray(detector, dtype=xp.complex128)))
    norm = float(xp.sum(xp.abs(probe) ** 2))
    if norm > 0 and power > 0:
        probe *= np.sqrt(power / norm)
    return probe.astype(np.complex64)
