"""Simulated datasets with known truth.

``pbtio3``: a lead-titanate-like perovskite seen along [001] by a 200 keV electron
probe (multislice). ``image``: an X-ray-like single-slice object from a test image.
``flyscan``: the ``image`` object scanned on the fly: the sample moves along the fast
axis (x) during every exposure, so each recorded pattern is the incoherent sum of the
patterns of several sub-positions (see :func:`flyscan_offsets`); Poisson noise by
default. Every kind writes the ground truth (``truth_object`` on the reconstruction
grid, and ``truth_probe``) into the same store.

Near field (``geometry="near-field"``, kind ``image`` only): the exit wave goes to the
detector by the Fresnel propagation over ``distance_m`` (default: a pixel Fresnel
number ``dx^2 / (lambda z)`` of 0.1, about that of the PETRA III P25 data) instead of a
Fourier transform; the probe is a broad beam filling the window with a smooth random
phase and amplitude structure (as a near-field beam's optics and diffuser give it), on
the pixel ``dx = lambda / (2 max_angle_rad)``. The store records ``geometry``,
``effective_distance_m``, ``magnification`` (1: a plane wave) and the Fresnel numbers,
as :func:`daskptycho.io.cxi.read_cxi` does.

Fly-scan motion model
---------------------
With a scan step of ``s = rint(step_m / dx)`` pixels and ``n = flyscan_subpositions``,
the sample is sampled at the midpoints of ``n`` equal parts of one step centred on the
nominal position, rounded to whole pixels (half away from zero, so the set is
symmetric): ``offsets_px = round(s * ((i + 0.5) / n - 0.5))``, ``i = 0..n-1``
(``s = 10, n = 5``: -4, -2, 0, 2, 4). The stored ``position`` is the nominal one (the
centre of the motion). A pattern is the mean over sub-positions of the coherent
far-field intensities, so its expected total is ``counts_per_pattern`` (or the dose
times the step area) times the object's mean transmission, exactly as for a static
scan. Sub-position windows reach up to ``max|offsets_px|`` pixels beyond the nominal
ones, so the truth lies on ``object_grid(position, window, dx, pad_px=P)`` with
``P = max|offsets_px|``, recorded as the attribute ``recommended_pad_px``: reconstruct
with ``daskptycho.reconstruct(ds, pad_px=ds.attrs["recommended_pad_px"])`` to get the
truth's grid (any ``pad_px`` works for comparisons, which go by coordinates).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import physics
from .errors import OptionsError
from .geometry import object_grid
from .io.store import build_dataset
from .io.stream import check_rate, replay
from .options import check_options

__all__ = ["SimulationOptions", "simulate", "simulate_stream", "pbtio3_potential", "flyscan_offsets", "near_field_beam"]

# Projected-potential peak phase of one atom (rad, at 200 keV) is set so a Pb atom
# gives ~0.35 rad; lighter atoms scale as Z**0.75 (roughly the Z dependence of
# electron scattering factors at low angle).
_PB_PEAK_PHASE = 0.35


@dataclass
class SimulationOptions:
    """Options of :func:`simulate` (unknown keys are rejected).

    Lengths in metres, angles in radians, energies in eV.
    """

    kind: str = "pbtio3"            # "pbtio3", "image" or "flyscan"
    scan: tuple = (16, 16)          # positions along (y, x)
    step_m: float | None = None     # scan step; default: 0.5 angstrom (pbtio3), 40 nm (image), 100 nm (flyscan)
    detector: int = 64              # pixels per side of the (square) detector
    slices: int | None = None       # default: 4 (pbtio3), 1 (image)
    slice_thickness_m: float | None = None  # default: one lattice constant (pbtio3), 1 um (image)
    energy_eV: float | None = None  # default: 200 keV (pbtio3), 8 keV (image)
    semiangle_rad: float | None = None      # default: 25 mrad (pbtio3), 2.5 mrad (image)
    defocus_m: float | None = None  # default: 8 nm (pbtio3), 48 um (image); positive = underfocus
    cs_m: float = 0.0
    max_angle_rad: float | None = None      # detector half-width; sets the pixel size
    probe_modes: int = 1
    # electrons (or photons) per square angstrom over one step area; None = no noise.
    # default: None (pbtio3, image), 0.5 (flyscan: 5e5 photons per 100 nm step)
    dose: float | None | str = "default"
    counts_per_pattern: float = 1e6  # total counts of a pattern when dose is None
    jitter_m: float = 0.0           # rms random error of the positions
    seed: int = 0
    flyscan_subpositions: int | None = None  # flyscan: sub-positions per exposure (default 5)
    geometry: str = "far-field"     # or "near-field" (kind "image" only): Fresnel propagation to the detector
    distance_m: float | None = None  # near field: sample-detector distance (default: pixel Fresnel number 0.1)

    def __post_init__(self):
        self.scan = tuple(int(v) for v in np.broadcast_to(np.asarray(self.scan), (2,)))
        if self.kind not in DEFAULTS:
            raise OptionsError("kind", f"got {self.kind!r}; expected 'pbtio3', 'image' or 'flyscan'")
        d = DEFAULTS[self.kind]
        for k, v in d.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if isinstance(self.dose, str):
            if self.dose != "default":
                raise OptionsError("dose", f"got {self.dose!r}; expected a positive number or None")
            self.dose = _DEFAULT_DOSE.get(self.kind)
        if self.kind == "flyscan":
            n = self.flyscan_subpositions
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise OptionsError("flyscan_subpositions", f"got {n!r}; expected an integer >= 1")
            self.flyscan_subpositions = int(n)
        elif self.flyscan_subpositions is not None:
            raise OptionsError("flyscan_subpositions", f"only applies to kind='flyscan' (kind is {self.kind!r})")
        if self.geometry not in ("far-field", "near-field"):
            raise OptionsError("geometry", f"got {self.geometry!r}; expected 'far-field' or 'near-field'")
        if self.geometry == "near-field" and self.kind != "image":
            raise OptionsError("geometry", f"'near-field' is simulated for kind='image' only (kind is {self.kind!r})")
        if self.distance_m is not None and (self.geometry != "near-field" or not self.distance_m > 0):
            raise OptionsError("distance_m", f"got {self.distance_m!r}; expected a positive number, with geometry='near-field' only")
        if min(self.scan) < 1:
            raise OptionsError("scan", f"got {self.scan}; expected at least 1x1 positions")
        if self.detector < 8 or self.detector % 2:
            raise OptionsError("detector", f"got {self.detector}; expected an even number of pixels >= 8")
        if self.slices < 1:
            raise OptionsError("slices", f"got {self.slices}; expected >= 1")
        for name in ("step_m", "slice_thickness_m", "energy_eV", "semiangle_rad", "max_angle_rad", "counts_per_pattern"):
            if not getattr(self, name) > 0:
                raise OptionsError(name, f"got {getattr(self, name)}; expected a positive number")
        if self.semiangle_rad >= self.max_angle_rad:
            raise OptionsError("semiangle_rad", "must be smaller than max_angle_rad (the probe must fit on the detector)")
        if self.dose is not None and not self.dose > 0:
            raise OptionsError("dose", f"got {self.dose}; expected a positive number or None")


#: Each kind's defaults: scan step, slices and their thickness, energy, probe (what SimulationOptions leaves None)
DEFAULTS = {
    "pbtio3": dict(step_m=0.5e-10, slices=4, slice_thickness_m=3.9e-10, energy_eV=200e3,
                   semiangle_rad=25e-3, defocus_m=80e-10, max_angle_rad=75e-3),
    "image": dict(step_m=40e-9, slices=1, slice_thickness_m=1e-6, energy_eV=8e3,
                  semiangle_rad=2.5e-3, defocus_m=48e-6, max_angle_rad=7.75e-3),
    "flyscan": dict(step_m=100e-9, slices=1, slice_thickness_m=1e-6, energy_eV=8e3,
                    semiangle_rad=2.5e-3, defocus_m=48e-6, max_angle_rad=7.75e-3,
                    flyscan_subpositions=5),
}
# default dose (per square angstrom) when none is given; None = noise-free
_DEFAULT_DOSE = {"flyscan": 0.5}


def flyscan_offsets(step_px, n):
    """Whole-pixel offsets (along x) of the ``n`` sub-positions of one fly-scan exposure.

    The midpoints of ``n`` equal parts of one step of ``step_px`` pixels centred on the
    nominal position, rounded half away from zero (symmetric about 0):
    ``round(step_px * ((i + 0.5) / n - 0.5))``. Offsets coincide when ``n > step_px``.

    Returns
    -------
    int array (n,)
    """
    f = step_px * ((np.arange(n) + 0.5) / n - 0.5)
    return (np.sign(f) * np.floor(np.abs(f) + 0.5)).astype(np.int64)


def _gaussian_splat(grid, atoms_yx, amplitude, width_m):
    """Sum of isotropic Gaussians on a grid, as one matrix product (separable)."""
    y, x = grid.y, grid.x
    gy = np.exp(-0.5 * ((y[:, None] - atoms_yx[None, :, 0]) / width_m) ** 2)
    gx = np.exp(-0.5 * ((x[:, None] - atoms_yx[None, :, 1]) / width_m) ** 2)
    return (gy * amplitude[None, :]) @ gx.T


def pbtio3_potential(grid, n_slices, energy_eV, rng, a=3.9e-10, width_m=0.25e-10, thermal_m=0.06e-10):
    """Phase of a PbTiO3-like crystal along [001], per slice.

    Columns in projection: Pb at the cell corners, Ti+O at the centre, O at the edge
    centres. Each slice holds one unit cell of thickness with independent thermal
    displacements, so slices differ.

    Returns
    -------
    phase : float array (S, H, W), radians; projected potential is ``phase / sigma``.
    """
    z = {"Pb": 82, "TiO": 22 + 8, "O": 8}
    y0, x0 = grid.origin_m
    h, w = grid.shape
    ny = int(np.ceil(h * grid.pixel_size_m / a)) + 2
    nx = int(np.ceil(w * grid.pixel_size_m / a)) + 2
    iy, ix = np.meshgrid(np.arange(-1, ny), np.arange(-1, nx), indexing="ij")
    cell = np.stack([iy.ravel(), ix.ravel()], axis=1) * a + np.array([y0, x0]) + rng.uniform(0, a, 2)
    sites = {"Pb": (0, 0), "TiO": (0.5, 0.5), "O1": (0.5, 0), "O2": (0, 0.5)}
    out = np.zeros((n_slices, h, w))
    for s in range(n_slices):
        for name, frac in sites.items():
            atoms = cell + np.array(frac) * a + rng.normal(0, thermal_m, cell.shape)
            zz = z["O"] if name.startswith("O") else z[name]
            amp = np.full(len(atoms), _PB_PEAK_PHASE * (zz / 82) ** 0.75)
            out[s] += _gaussian_splat(grid, atoms, amp, width_m)
    return out


def _test_image_phase(grid, rng):
    """Phase (rad) and amplitude of an X-ray-like object from matplotlib's sample image
    (Grace Hopper) and a Siemens star, resampled to the grid."""
    import matplotlib.cbook as cbook
    import matplotlib.image as mpimg
    from scipy import ndimage

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = mpimg.imread(f, format="jpg").astype(np.float64).mean(axis=2) / 255.0
    h, w = grid.shape
    img = ndimage.zoom(img, (h / img.shape[0], w / img.shape[1]), order=1)[:h, :w]
    yy, xx = np.meshgrid(np.arange(h) - h / 2, np.arange(w) - w / 2, indexing="ij")
    star = 0.5 * (1 + np.sign(np.sin(16 * np.arctan2(yy, xx))))
    star *= np.hypot(yy, xx) < 0.45 * min(h, w)
    phase = 1.2 * img
    amplitude = 1.0 - 0.25 * star
    return phase, amplitude


def simulate(options: SimulationOptions | dict | None = None, **kw):
    """Simulate a dataset with known truth.

    Parameters
    ----------
    options : SimulationOptions or dict
        See :class:`SimulationOptions`; keywords override.

    Returns
    -------
    xarray.Dataset
        In the daskptycho format, with ``truth_object`` (S, H, W) on the grid that
        ``reconstruct`` builds (``pad_px=0``; for ``flyscan`` ``pad_px`` equal to the
        attribute ``recommended_pad_px``) and ``truth_probe``. ``flyscan`` also records
        ``flyscan_subpositions``, ``flyscan_offsets_px`` (x offsets in pixels of the
        sub-positions from the stored nominal position), ``flyscan_axis`` and
        ``flyscan_model`` (see the module docstring).
    """
    opts = check_options(SimulationOptions, options, kw)
    rng = np.random.default_rng(opts.seed)
    radiation = "electron" if opts.kind == "pbtio3" else "xray"
    lam = physics.wavelength(radiation, opts.energy_eV)
    dx = lam / (2 * opts.max_angle_rad)
    n = opts.detector
    window = (n, n)

    iy, ix = np.meshgrid(np.arange(opts.scan[0]), np.arange(opts.scan[1]), indexing="ij")
    nominal = np.stack([iy.ravel(), ix.ravel()], axis=1) * opts.step_m
    # positions on the pixel lattice keep the truth exactly on the reconstruction grid
    nominal = np.rint(nominal / dx) * dx
    positions = nominal + rng.normal(0, opts.jitter_m, nominal.shape) if opts.jitter_m else nominal
    if opts.kind == "flyscan":
        # motion during the exposure along the fast axis x, in whole pixels
        offsets_px = flyscan_offsets(int(np.rint(opts.step_m / dx)), opts.flyscan_subpositions)
    else:
        offsets_px = np.zeros(1, dtype=np.int64)
    pad_px = int(np.abs(offsets_px).max())  # the sub-position windows must fit in the grid
    grid = object_grid(positions, window, dx, pad_px=pad_px)

    if opts.kind == "pbtio3":
        phase = pbtio3_potential(grid, opts.slices, opts.energy_eV, rng)
        absorption = 0.03 * phase
    else:
        phase2d, amp2d = _test_image_phase(grid, rng)
        phase = np.repeat(phase2d[None] / opts.slices, opts.slices, axis=0)
        absorption = np.repeat(-np.log(amp2d)[None] / opts.slices, opts.slices, axis=0)
    truth = np.exp(1j * phase - absorption).astype(np.complex64)

    near = opts.geometry == "near-field"
    if near:
        distance = opts.distance_m or dx * dx / (0.1 * lam)
        probe = near_field_beam(window, rng)
    else:
        probe = physics.aperture_probe(window, dx, lam, opts.semiangle_rad, opts.defocus_m, opts.cs_m)
    if opts.dose is not None:
        scale = opts.dose * (opts.step_m * 1e10) ** 2  # particles per pattern
    else:
        scale = opts.counts_per_pattern
    probe = physics.probe_modes(probe, opts.probe_modes, seed=opts.seed) * np.float32(np.sqrt(scale))

    kernel = physics.fresnel_kernel(window, dx, lam, opts.slice_thickness_m)
    if near:  # the detector's Fresnel propagation travels with the slice kernel
        kernel = physics.propagation.propagators(kernel, physics.propagation.detector_kernel(window, dx, lam, distance))
    from .tasks.updates import positions_per_chunk

    chunk = positions_per_chunk(window, opts.slices, opts.probe_modes, 64)
    intensity = np.zeros((positions.shape[0], n, n), dtype=np.float32)
    for off in offsets_px:  # a few sub-positions; each is vectorised over positions
        corners = grid.window_corners(positions + np.array([0.0, off * dx]), window)
        for s in range(0, corners.shape[0], chunk):  # window indices and patterns per chunk: bounded memory
            index = physics.window_index(corners[s:s + chunk], window, grid.shape)
            intensity[s:s + chunk] += physics.far_field_intensity(truth, probe, index, kernel)
    if offsets_px.size > 1:
        intensity /= np.float32(offsets_px.size)  # mean: the exposure's total is the same as a static one's
    intensity = np.maximum(intensity, 0)
    if opts.dose is not None:
        intensity = rng.poisson(intensity).astype(np.float32)

    attrs = {
        "probe_semiangle_rad": opts.semiangle_rad,
        "probe_defocus_m": opts.defocus_m,
        "probe_cs_m": opts.cs_m,
        "probe_modes": opts.probe_modes,
        "geometry": opts.geometry,
        "simulation": opts.kind,
        "simulation_options": repr(dataclasses.asdict(opts)),
    }
    if near:
        from .radiation import fresnel_number

        attrs.update({"effective_distance_m": float(distance), "detector_distance_m": float(distance), "magnification": 1.0,
                      "fresnel_number": fresnel_number(n * dx, lam, distance), "fresnel_number_pixel": fresnel_number(dx, lam, distance)})
        for key in ("probe_semiangle_rad", "probe_defocus_m", "probe_cs_m"):  # not what formed this probe
            attrs.pop(key)
    if opts.kind == "flyscan":
        attrs.update({
            "flyscan_subpositions": int(offsets_px.size),
            "flyscan_offsets_px": [int(v) for v in offsets_px],
            "flyscan_axis": "x",
            "flyscan_model": "each pattern is the mean of the coherent far-field intensities at position + "
                             "(0, offset * pixel_size_m) for every offset in flyscan_offsets_px (sample motion "
                             "along x during the exposure); position is the centre of the motion",
            "recommended_pad_px": pad_px,
        })
    return build_dataset(
        intensity, positions, radiation=radiation, energy_eV=opts.energy_eV, wavelength_m=lam,
        pixel_size_m=dx, truth_object=truth, truth_probe=probe, truth_grid=grid,
        slice_thickness_m=opts.slice_thickness_m, attrs=attrs,
    )


def near_field_beam(window, rng, phase_rad=1.0, amplitude_contrast=0.2, width_px=None):
    """A near-field illumination: a broad beam filling ``window`` with a smooth random
    phase (rms ``phase_rad``) and amplitude (rms ``amplitude_contrast``) structure on a
    super-Gaussian envelope (FWHM about 85% of the window), ``sum |P|^2 = 1``.

    Parameters
    ----------
    window : (int, int)
        (N_y, N_x), pixels.
    rng : numpy.random.Generator
    width_px : float, optional
        Correlation length of the structure, pixels (default: N / 8).

    Returns
    -------
    complex64 array (N_y, N_x)
    """
    from scipy import ndimage

    ny, nx = window
    width = width_px or max(ny, nx) / 8

    def smooth():
        f = ndimage.gaussian_filter(rng.normal(size=window), width, mode="wrap")
        return f / (f.std() + 1e-30)

    yy, xx = np.meshgrid((np.arange(ny) - ny // 2) / (0.425 * ny), (np.arange(nx) - nx // 2) / (0.425 * nx), indexing="ij")
    envelope = np.exp(-np.log(2) * (yy ** 2 + xx ** 2) ** 3)
    probe = envelope * (1 + amplitude_contrast * smooth()) * np.exp(1j * phase_rad * smooth())
    probe /= np.sqrt(np.sum(np.abs(probe) ** 2))
    return probe.astype(np.complex64)


def simulate_stream(path, rate_hz, *, chunk_frames=None, overwrite=False, progress=None, options: SimulationOptions | dict | None = None, **kw):
    """Simulate a dataset and write it as a growing store, ``rate_hz`` frames per second:
    an acquisition for tests and demos of reconstructions that follow a scan.

    The whole dataset is simulated first (in memory), then replayed into ``path`` by
    :func:`daskptycho.io.stream.replay`, in this process: run it in a thread or a
    subprocess (``daskptycho simulate OUT --stream RATE``) to read the store meanwhile.

    Parameters
    ----------
    path : str or path-like
        The store to create.
    rate_hz : float
        Frames per second.
    chunk_frames : int, optional
        Frames per chunk along ``scan`` (the unit of a commit).
    overwrite : bool
        Replace an existing store.
    progress : callable, optional
        ``progress(frames_complete, n_frames)`` after every commit.
    options, **kw
        As for :func:`simulate`.

    Returns
    -------
    daskptycho.io.stream.StreamState
        The finished store's state.
    """
    rate_hz = check_rate(rate_hz)  # before minutes of simulation
    ds = simulate(options, **kw)
    return replay(ds, path, rate_hz, chunk_frames=chunk_frames, overwrite=overwrite, progress=progress)
