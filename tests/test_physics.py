"""Physics of daskptycho checked against independent facts.

* gradients against central finite differences (Wirtinger convention of
  ``physics/cost.py``: ``L(z + dz) - L(z) ~ Re(sum(conj(g) dz))``);
* ``backward`` is the adjoint of the Jacobian of ``forward`` (exact inner-product
  identities, using that the model is linear in each slice and in the probe);
* Fresnel propagation: unit-modulus kernel, unitarity, group law, Gaussian-beam
  spreading ``w(z) = w0 sqrt(1 + (z / zR)^2)``;
* textbook constants (electron wavelength, interaction constant, X-ray wavelength);
* probe formation and probe modes;
* energy conservation for pure-phase objects (Parseval).
"""

from __future__ import annotations

import numpy as np
import pytest

from daskptycho import physics

N = 16
WINDOW = (N, N)
DX = 0.2e-10                # pixel size, m
LAM = 2.5e-12               # wavelength, m (about 200 keV electrons)
DZ = 2e-10                  # slice spacing, m: a kernel phase of a few radians at the Nyquist edge
OBJ_HW = (24, 26)           # object slice (H, W)


def _crandn(rng, shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def _vdot_re(a, b):
    """Re <a, b> = Re sum(conj(a) b), the real inner product the gradients live in."""
    return float(np.real(np.vdot(np.ravel(a), np.ravel(b))))


def _problem(seed=0, n_slices=3, n_modes=2, n_pos=6, pure_phase=False):
    rng = np.random.default_rng(seed)
    corners = np.stack([rng.integers(0, OBJ_HW[0] - N + 1, n_pos), rng.integers(0, OBJ_HW[1] - N + 1, n_pos)], axis=1)
    # make two windows overlap exactly so repeated indices have to accumulate
    corners[1] = corners[0]
    index = physics.window_index(corners, WINDOW, OBJ_HW)
    phase = rng.uniform(-1, 1, (n_slices,) + OBJ_HW)
    if pure_phase:
        obj = np.exp(1j * phase)
    else:
        obj = np.exp(1j * phase - rng.uniform(0, 0.3, phase.shape))
    probe = 0.3 * _crandn(rng, (n_modes, N, N))
    kernel = physics.fresnel_kernel(WINDOW, DX, LAM, DZ, dtype=np.complex128)
    return rng, obj.astype(np.complex128), probe.astype(np.complex128), index, kernel, corners


# --------------------------------------------------------------------------- index


def test_window_index_points_at_the_window_pixels():
    corners = np.array([[0, 0], [3, 5], [8, 10]])
    idx = physics.window_index(corners, (N, N), OBJ_HW)
    assert idx.shape == (3, N, N)
    h, w = OBJ_HW
    for j, (r, c) in enumerate(corners):
        rows, cols = np.divmod(idx[j], w)
        np.testing.assert_array_equal(rows, r + np.arange(N)[:, None] + 0 * np.arange(N)[None, :])
        np.testing.assert_array_equal(cols, c + np.arange(N)[None, :] + 0 * np.arange(N)[:, None])
    with pytest.raises(ValueError):
        physics.window_index(np.array([[h - N + 1, 0]]), (N, N), OBJ_HW)
    with pytest.raises(ValueError):
        physics.window_index(np.array([[0, -1]]), (N, N), OBJ_HW)


# --------------------------------------------------------------------------- gradients


def _cost(obj, probe, index, kernel, intensity, mask, kind):
    far = physics.forward(obj, probe, index, kernel)
    return physics.cost_and_far_field_gradient(far, intensity, mask, kind)[0]


@pytest.mark.parametrize("kind", ["amplitude", "poisson"])
@pytest.mark.parametrize("use_mask", [True, False])
def test_gradients_match_central_finite_differences(kind, use_mask):
    rng, obj, probe, index, kernel, _ = _problem(seed=1)
    # "measured" data: a different object's intensities, scaled and noisy, strictly positive
    other = obj * np.exp(0.3j * rng.standard_normal(obj.shape))
    meas = np.sum(np.abs(physics.forward(other, probe, index, kernel)) ** 2, axis=1)
    meas = meas * rng.uniform(0.5, 1.5, meas.shape) + 1e-3
    mask = (rng.uniform(size=WINDOW) > 0.2) if use_mask else None

    out = physics.gradients(obj, probe, index, kernel, meas, mask=mask, cost=kind)
    cost0 = _cost(obj, probe, index, kernel, meas, mask, kind)
    assert out["cost"] == pytest.approx(cost0, rel=1e-12)
    assert out["object"].shape == obj.shape and out["probe"].shape == probe.shape

    # the independent cost functions agree with the fused one
    far = physics.forward(obj, probe, index, kernel)
    separate = physics.amplitude_cost if kind == "amplitude" else physics.poisson_cost
    assert separate(far, meas, mask) == pytest.approx(cost0, rel=1e-12)

    h = 1e-6
    for trial in range(2):
        # object, every slice at once
        d_obj = _crandn(rng, obj.shape)
        fd = (_cost(obj + h * d_obj, probe, index, kernel, meas, mask, kind)
              - _cost(obj - h * d_obj, probe, index, kernel, meas, mask, kind)) / (2 * h)
        an = _vdot_re(out["object"], d_obj)
        assert abs(fd - an) <= 1e-4 * abs(an), (trial, fd, an)
        # each slice on its own (catches a gradient that is right only in sum)
        for s in range(obj.shape[0]):
            d1 = np.zeros_like(obj)
            d1[s] = d_obj[s]
            fd = (_cost(obj + h * d1, probe, index, kernel, meas, mask, kind)
                  - _cost(obj - h * d1, probe, index, kernel, meas, mask, kind)) / (2 * h)
            an = _vdot_re(out["object"], d1)
            assert abs(fd - an) <= 1e-4 * abs(an), (trial, s, fd, an)
        # probe, every mode
        d_probe = _crandn(rng, probe.shape)
        fd = (_cost(obj, probe + h * d_probe, index, kernel, meas, mask, kind)
              - _cost(obj, probe - h * d_probe, index, kernel, meas, mask, kind)) / (2 * h)
        an = _vdot_re(out["probe"], d_probe)
        assert abs(fd - an) <= 1e-4 * abs(an), (trial, fd, an)


@pytest.mark.parametrize("kind", ["amplitude", "poisson"])
def test_far_field_gradient_matches_finite_differences(kind):
    rng = np.random.default_rng(7)
    far = _crandn(rng, (3, 2, 8, 8))
    meas = rng.uniform(0.1, 4, (3, 8, 8))
    mask = rng.uniform(size=(8, 8)) > 0.3
    cost, g = physics.cost_and_far_field_gradient(far, meas, mask, kind)
    # the definitions of the docstrings, written out here
    model = np.sum(np.abs(far) ** 2, axis=1)
    if kind == "amplitude":
        expect = np.sum(mask * (np.sqrt(model) - np.sqrt(meas)) ** 2)
    else:
        expect = np.sum(mask * (model - meas * np.log(model)))
    assert cost == pytest.approx(expect, rel=1e-12)
    h = 1e-6
    d = _crandn(rng, far.shape)
    fd = (physics.cost_and_far_field_gradient(far + h * d, meas, mask, kind)[0]
          - physics.cost_and_far_field_gradient(far - h * d, meas, mask, kind)[0]) / (2 * h)
    assert fd == pytest.approx(_vdot_re(g, d), rel=1e-6)
    # masked pixels carry no gradient
    assert np.all(g[:, :, ~mask] == 0)


def test_unknown_cost_is_rejected():
    far = np.ones((1, 1, 4, 4), complex)
    with pytest.raises(ValueError, match="cost"):
        physics.cost_and_far_field_gradient(far, np.ones((1, 4, 4)), None, "gaussian")


# --------------------------------------------------------------------------- adjoint


def test_backward_is_adjoint_of_forward_single_slice():
    """One slice: the far field is linear in the object, so <F(dO), v> = <dO, F^H v>."""
    rng, obj, probe, index, kernel, _ = _problem(seed=2, n_slices=1, n_modes=1)
    _, cache = physics.forward(obj, probe, index, kernel, keep=True)
    v = _crandn(rng, (index.shape[0], 1, N, N))
    adj = physics.backward(v, cache, index, obj.shape, kernel)["object"]
    for _ in range(3):
        d_obj = _crandn(rng, obj.shape)
        lhs = _vdot_re(physics.forward(d_obj, probe, index, kernel), v)
        rhs = _vdot_re(d_obj, adj)
        assert rhs == pytest.approx(lhs, rel=1e-10, abs=1e-12 * np.abs(lhs))
    # a pixel that no window touches gets no gradient
    touched = np.zeros(obj.shape[1:], bool).ravel()
    touched[np.unique(index)] = True
    assert np.all(adj.reshape(-1)[~touched] == 0)


@pytest.mark.parametrize("s", [0, 1, 2])
def test_backward_is_adjoint_of_forward_per_slice(s):
    """The far field is linear in slice ``s`` with the other slices fixed; the Jacobian
    depends on the slices before ``s`` (the incident wave) and after ``s`` (the
    propagation to the exit), never on slice ``s`` itself."""
    rng, obj, probe, index, kernel, _ = _problem(seed=3, n_slices=3, n_modes=2)
    v = _crandn(rng, (index.shape[0], 2, N, N))
    _, cache = physics.forward(obj, probe, index, kernel, keep=True)
    adj = physics.backward(v, cache, index, obj.shape, kernel)["object"][s]
    for _ in range(2):
        d_obj = obj.copy()
        d_obj[s] = _crandn(rng, obj.shape[1:])
        lhs = _vdot_re(physics.forward(d_obj, probe, index, kernel), v)
        rhs = _vdot_re(d_obj[s], adj)
        assert rhs == pytest.approx(lhs, rel=1e-10)
        # the Jacobian w.r.t. slice s does not depend on slice s: same answer from a
        # cache taken at the perturbed point
        _, cache2 = physics.forward(d_obj, probe, index, kernel, keep=True)
        adj2 = physics.backward(v, cache2, index, obj.shape, kernel)["object"][s]
        np.testing.assert_allclose(adj2, adj, rtol=1e-10, atol=1e-12 * np.abs(adj).max())


def test_backward_is_adjoint_of_forward_probe():
    rng, obj, probe, index, kernel, _ = _problem(seed=4, n_slices=3, n_modes=2)
    v = _crandn(rng, (index.shape[0], 2, N, N))
    _, cache = physics.forward(obj, probe, index, kernel, keep=True)
    out = physics.backward(v, cache, index, obj.shape, kernel)
    for _ in range(2):
        d_probe = _crandn(rng, probe.shape)
        lhs = _vdot_re(physics.forward(obj, d_probe, index, kernel), v)
        rhs = _vdot_re(d_probe, out["probe"])
        assert rhs == pytest.approx(lhs, rel=1e-10)


def test_backward_illumination():
    """``illumination`` of slice 0 is sum_j sum_k |P_k|^2 under each window and
    ``probe_illumination`` is sum_j |O_0 patch|^2 (computed here by plain loops)."""
    rng, obj, probe, index, kernel, corners = _problem(seed=5, n_slices=2, n_modes=2)
    _, cache = physics.forward(obj, probe, index, kernel, keep=True)
    v = _crandn(rng, (index.shape[0], 2, N, N))
    out = physics.backward(v, cache, index, obj.shape, kernel)
    expect = np.zeros(OBJ_HW)
    p_ill = np.zeros(WINDOW)
    for r, c in corners:
        expect[r:r + N, c:c + N] += np.sum(np.abs(probe) ** 2, axis=0)
        p_ill += np.abs(obj[0, r:r + N, c:c + N]) ** 2
    np.testing.assert_allclose(out["illumination"][0], expect, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["probe_illumination"], p_ill, rtol=1e-12)
    assert np.all(out["illumination"] >= 0)
    assert "probe" not in physics.backward(v, cache, index, obj.shape, kernel, probe_gradient=False)


def test_forward_matches_a_direct_multislice():
    """The batched forward model equals a plain per-position loop written with numpy.fft."""
    rng, obj, probe, index, kernel, corners = _problem(seed=6, n_slices=3, n_modes=2)
    far = physics.forward(obj, probe, index, kernel)
    k2 = np.fft.fftfreq(N, DX)[:, None] ** 2 + np.fft.fftfreq(N, DX)[None, :] ** 2
    h = np.exp(-1j * np.pi * LAM * DZ * k2)
    for j, (r, c) in enumerate(corners):
        for k in range(probe.shape[0]):
            psi = probe[k]
            for s in range(obj.shape[0]):
                psi = psi * obj[s, r:r + N, c:c + N]
                if s < obj.shape[0] - 1:
                    psi = np.fft.ifft2(np.fft.fft2(psi) * h)
            np.testing.assert_allclose(far[j, k], np.fft.fft2(psi, norm="ortho"), rtol=1e-10, atol=1e-12)
    inten = physics.far_field_intensity(obj, probe, index, kernel)
    np.testing.assert_allclose(inten, np.fft.fftshift(np.sum(np.abs(far) ** 2, axis=1), axes=(-2, -1)), rtol=1e-12)


# --------------------------------------------------------------------------- propagation


def test_fresnel_kernel_is_unit_modulus_and_has_group_law():
    shape = (32, 40)
    h1 = physics.fresnel_kernel(shape, DX, LAM, 3e-10, dtype=np.complex128)
    h2 = physics.fresnel_kernel(shape, DX, LAM, -1.3e-10, dtype=np.complex128)
    h12 = physics.fresnel_kernel(shape, DX, LAM, 1.7e-10, dtype=np.complex128)
    assert h1.shape == shape and h1.dtype == np.complex128
    np.testing.assert_allclose(np.abs(h1), 1, atol=1e-14)
    np.testing.assert_allclose(h1 * h2, h12, atol=1e-12)
    # zero frequency (FFT order: index [0, 0]) is untouched; zero distance is the identity
    assert h1[0, 0] == pytest.approx(1)
    np.testing.assert_allclose(physics.fresnel_kernel(shape, DX, LAM, 0.0, dtype=np.complex128), 1, atol=0)
    # default dtype is single precision, still unit modulus
    h32 = physics.fresnel_kernel(shape, DX, LAM, 3e-10)
    assert h32.dtype == np.complex64
    np.testing.assert_allclose(np.abs(h32), 1, atol=1e-6)


def test_propagate_is_unitary_and_composes():
    rng = np.random.default_rng(10)
    wave = _crandn(rng, (3, 32, 32))
    h = {dz: physics.fresnel_kernel((32, 32), DX, LAM, dz, dtype=np.complex128) for dz in (2e-10, 5e-10, 7e-10, -2e-10)}
    out = physics.propagate(wave, h[2e-10])
    assert out.shape == wave.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=(1, 2)), np.linalg.norm(wave, axis=(1, 2)), rtol=1e-10)
    assert not np.allclose(out, wave)  # it did something
    np.testing.assert_allclose(physics.propagate(out, h[5e-10]), physics.propagate(wave, h[7e-10]), atol=1e-10)
    np.testing.assert_allclose(physics.propagate(out, h[-2e-10]), wave, atol=1e-10)


@pytest.mark.parametrize("z_over_zr", [0.5, 2.0])
def test_gaussian_beam_spreads_as_fresnel_theory(z_over_zr):
    n, dx, lam = 256, 1e-9, 1e-10
    w0 = 8 * dx
    zr = np.pi * w0**2 / lam
    c = (np.arange(n) - n // 2) * dx
    y, x = np.meshgrid(c, c, indexing="ij")
    psi0 = np.exp(-(x**2 + y**2) / w0**2)   # |psi|^2 = exp(-2 r^2 / w^2)

    def width(psi):
        i = np.abs(psi) ** 2
        i = i / i.sum()
        # w = 2 sigma for the intensity exp(-2 x^2 / w^2); average the two axes
        var_x = np.sum(i * (x - np.sum(i * x)) ** 2)
        var_y = np.sum(i * (y - np.sum(i * y)) ** 2)
        return 2 * np.sqrt(0.5 * (var_x + var_y))

    assert width(psi0) == pytest.approx(w0, rel=1e-3)
    z = z_over_zr * zr
    psi = physics.propagate(psi0, physics.fresnel_kernel((n, n), dx, lam, z, dtype=np.complex128))
    assert width(psi) == pytest.approx(w0 * np.sqrt(1 + (z / zr) ** 2), rel=1e-2)
    # the Gouy-free paraxial on-axis amplitude of a 2-D Gaussian: |psi(0, z)| = w0 / w(z)
    assert abs(psi[n // 2, n // 2]) == pytest.approx(1 / np.sqrt(1 + (z / zr) ** 2), rel=1e-2)


# --------------------------------------------------------------------------- constants


def test_electron_wavelength_textbook_values():
    assert physics.electron_wavelength(200e3) == pytest.approx(2.5079e-12, rel=2e-4)
    assert physics.electron_wavelength(300e3) == pytest.approx(1.9687e-12, rel=2e-4)
    assert physics.electron_wavelength(100e3) == pytest.approx(3.7014e-12, rel=2e-4)
    # low energy: non-relativistic limit h / sqrt(2 m e V) = 1.2264 nm / sqrt(V)
    assert physics.electron_wavelength(10.0) == pytest.approx(1.2264e-9 / np.sqrt(10.0), rel=1e-4)
    assert physics.wavelength("electron", 200e3) == physics.electron_wavelength(200e3)


def test_interaction_constant_textbook_value():
    # Kirkland: sigma(200 kV) = 7.29e-4 rad / (V angstrom) = 7.29e6 rad / (V m)
    assert physics.interaction_constant(200e3) == pytest.approx(7.29e6, rel=5e-3)
    # 300 kV: 6.53e-4 rad / (V angstrom)
    assert physics.interaction_constant(300e3) == pytest.approx(6.53e6, rel=5e-3)


def test_xray_wavelength():
    assert physics.xray_wavelength(12.398e3) == pytest.approx(1.0000e-10, rel=1e-4)
    assert physics.xray_wavelength(10e3) == pytest.approx(1.2398e-10, rel=1e-4)
    assert physics.wavelength("xray", 8e3) == physics.xray_wavelength(8e3)
    with pytest.raises(ValueError, match="radiation"):
        physics.wavelength("neutron", 8e3)


# --------------------------------------------------------------------------- probe

PN, PDX, PLAM, ALPHA = 64, 0.2e-10, 2.5079e-12, 20e-3


def _r50(p):
    """Radius (pixels, about pixel N // 2) that holds half the probe's power: robust to
    the slowly decaying Airy tails that make an rms radius grid-dependent."""
    i = np.abs(p) ** 2
    c = np.arange(p.shape[-1]) - p.shape[-1] // 2
    r = np.hypot(c[:, None], c[None, :]).ravel()
    order = np.argsort(r)
    cum = np.cumsum(i.ravel()[order]) / i.sum()
    return r[order][np.searchsorted(cum, 0.5)]


def test_aperture_probe_power_and_band_limit():
    p = physics.aperture_probe((PN, PN), PDX, PLAM, ALPHA, defocus_m=5e-9, cs_m=1e-3, dtype=np.complex128)
    assert p.shape == (PN, PN) and p.dtype == np.complex128
    assert np.sum(np.abs(p) ** 2) == pytest.approx(1, rel=1e-12)
    spec = np.abs(np.fft.fft2(p))
    k = np.hypot(np.fft.fftfreq(PN, PDX)[:, None], np.fft.fftfreq(PN, PDX)[None, :])
    kmax = ALPHA / PLAM
    assert spec[k > kmax * 1.0001].max() < 1e-10 * spec.max()
    assert spec[k < kmax * 0.9999].min() > 0.5 * spec.max()  # flat inside the aperture
    # single precision by default, still unit power
    p32 = physics.aperture_probe((PN, PN), PDX, PLAM, ALPHA)
    assert p32.dtype == np.complex64
    assert float(np.sum(np.abs(p32.astype(np.complex128)) ** 2)) == pytest.approx(1, rel=1e-5)
    # an in-focus aberration-free probe is centred on pixel N // 2 and real-positive there
    p0 = physics.aperture_probe((PN, PN), PDX, PLAM, ALPHA, dtype=np.complex128)
    assert np.unravel_index(np.argmax(np.abs(p0)), p0.shape) == (PN // 2, PN // 2)


def test_aperture_probe_central_stop_and_too_large_aperture():
    p = physics.aperture_probe((PN, PN), PDX, PLAM, ALPHA, central_stop=0.5, dtype=np.complex128)
    spec = np.abs(np.fft.fft2(p))
    k = np.hypot(np.fft.fftfreq(PN, PDX)[:, None], np.fft.fftfreq(PN, PDX)[None, :])
    kmax = ALPHA / PLAM
    assert spec[k < 0.5 * kmax * 0.999].max() < 1e-10 * spec.max()
    assert spec[(k > 0.5 * kmax * 1.001) & (k < kmax * 0.999)].min() > 0.5 * spec.max()
    with pytest.raises(ValueError, match="pixel_size"):
        physics.aperture_probe((PN, PN), PDX, PLAM, 0.2)  # kmax beyond the Nyquist frequency


def test_defocus_sign_positive_is_underfocus():
    focus = physics.aperture_probe((PN, PN), PDX, PLAM, ALPHA, dtype=np.complex128)
    df = 10e-9  # geometric disc radius df * alpha = 10 pixels; Airy radius ~ 4 pixels
    under = physics.aperture_probe((PN, PN), PDX, PLAM, ALPHA, defocus_m=df, dtype=np.complex128)
    assert _r50(under) > 1.5 * _r50(focus)
    # underfocus: the crossover lies downstream, so propagating the probe downstream
    # (positive distance) by the defocus brings it to focus ...
    k = physics.fresnel_kernel((PN, PN), PDX, PLAM, df, dtype=np.complex128)
    np.testing.assert_allclose(physics.propagate(under, k), focus, atol=1e-10)
    # ... and propagating it upstream makes it larger still
    k_up = physics.fresnel_kernel((PN, PN), PDX, PLAM, -df, dtype=np.complex128)
    assert _r50(physics.propagate(under, k_up)) > 1.5 * _r50(under)


def test_electron_and_xray_probe_wrappers():
    e = physics.electron_probe((PN, PN), PDX, PLAM, ALPHA, 3e-9, 1e-3, dtype=np.complex128)
    np.testing.assert_array_equal(e, physics.aperture_probe((PN, PN), PDX, PLAM, ALPHA, 3e-9, 1e-3, dtype=np.complex128))
    x = physics.xray_probe((PN, PN), PDX, PLAM, ALPHA, 3e-9, central_stop=0.3, dtype=np.complex128)
    np.testing.assert_array_equal(
        x, physics.aperture_probe((PN, PN), PDX, PLAM, ALPHA, 3e-9, 0.0, central_stop=0.3, dtype=np.complex128))


@pytest.mark.parametrize("n_modes", [1, 2, 4, 8])
def test_probe_modes(n_modes):
    p = 3.0 * physics.aperture_probe((32, 32), PDX, PLAM, ALPHA, defocus_m=3e-9, dtype=np.complex128)
    modes = physics.probe_modes(p, n_modes)
    assert modes.shape == (n_modes, 32, 32) and modes.dtype == p.dtype
    flat = modes.reshape(n_modes, -1)
    power = np.sum(np.abs(flat) ** 2, axis=1)
    total = np.sum(np.abs(p) ** 2)
    assert power.sum() == pytest.approx(total, rel=1e-10)
    # mode 0 is proportional to the input (Cauchy-Schwarz with equality)
    assert abs(np.vdot(flat[0], p.ravel())) == pytest.approx(np.linalg.norm(flat[0]) * np.linalg.norm(p), rel=1e-10)
    if n_modes > 1:
        assert power[0] == pytest.approx(0.7 * total, rel=1e-10)  # default first_fraction
        gram = flat.conj() @ flat.T
        off = gram - np.diag(np.diag(gram))
        assert np.abs(off).max() < 1e-10 * total
        assert np.all(power > 0)
    # accepts (1, N, N) as well
    np.testing.assert_allclose(physics.probe_modes(p[None], n_modes), modes, atol=1e-14)


def test_orthogonalize_modes_keeps_the_density_matrix():
    rng = np.random.default_rng(11)
    modes = _crandn(rng, (3, 12, 12))
    modes[1] += 0.8 * modes[0]  # strongly non-orthogonal
    new, frac = physics.orthogonalize_modes(modes)
    assert new.shape == modes.shape and frac.shape == (3,)
    flat0 = modes.reshape(3, -1)
    flat = new.reshape(3, -1)
    gram = flat.conj() @ flat.T
    assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-10 * np.abs(gram).max()
    assert frac.sum() == pytest.approx(1, rel=1e-12)
    assert np.all(np.diff(frac) <= 0)  # sorted by decreasing power
    power = np.sum(np.abs(flat) ** 2, axis=1)
    np.testing.assert_allclose(frac, power / power.sum(), rtol=1e-12)
    rho0 = flat0.T @ flat0.conj()   # sum_k |P_k><P_k|
    rho = flat.T @ flat.conj()
    np.testing.assert_allclose(rho, rho0, atol=1e-10 * np.abs(rho0).max())
    # the new modes are eigenvectors of the density matrix with eigenvalue = their power
    for k in range(3):
        np.testing.assert_allclose(rho0 @ flat[k], power[k] * flat[k], atol=1e-9 * power[0])
    # the model intensity of incoherent modes is unchanged
    assert np.sum(np.abs(new) ** 2, axis=0) == pytest.approx(np.sum(np.abs(modes) ** 2, axis=0), rel=1e-10)


# --------------------------------------------------------------------------- energy


@pytest.mark.parametrize("n_slices", [1, 3])
def test_pure_phase_object_conserves_energy(n_slices):
    _, obj, probe, index, kernel, _ = _problem(seed=12, n_slices=n_slices, n_modes=2, pure_phase=True)
    far = physics.forward(obj, probe, index, kernel)
    per_pos = np.sum(np.abs(far) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(per_pos, np.sum(np.abs(probe) ** 2), rtol=1e-10)
    # each mode separately, too
    np.testing.assert_allclose(np.sum(np.abs(far) ** 2, axis=(2, 3)),
                               np.broadcast_to(np.sum(np.abs(probe) ** 2, axis=(1, 2)), far.shape[:2]), rtol=1e-10)
    inten = physics.far_field_intensity(obj, probe, index, kernel)
    np.testing.assert_allclose(inten.sum(axis=(1, 2)), np.sum(np.abs(probe) ** 2), rtol=1e-10)
    # an absorbing object loses energy
    far_abs = physics.forward(0.9 * obj, probe, index, kernel)
    assert np.all(np.sum(np.abs(far_abs) ** 2, axis=(1, 2, 3)) < per_pos)
