"""CXI 1.6 (HDF5) import and export (see ``docs/format.md``, "CXI import/export").

:func:`read_cxi`
    A ptychography CXI file -> an in-memory dataset in the daskptycho format
    (:func:`daskptycho.io.store.build_dataset`), far- or near-field.
:func:`write_cxi`
    A result store (object, probe, cost, positions and geometry of its input) or a
    dataset store (patterns, mask, positions, geometry) -> a CXI 1.6 file, written
    atomically (temporary name, then :func:`os.replace`).
:func:`read_cxi_result`
    The object, probe and cost that :func:`write_cxi` wrote, back as an
    :class:`xarray.Dataset` (for round trips and for reading our exports).

Conventions (CXI 1.6, section "Geometry"): SI units everywhere (energy in joules);
the lab frame is right-handed with z along the beam (downstream), y up and x
horizontal; ``sample_1/geometry_1/translation`` is the sample's (x, y, z)
translation; ``detector_1/basis_vectors`` hold, one row per data dimension, the 3-D
step from one pixel to the next (default ``[[0, -y_pixel_size, 0], [-x_pixel_size,
0, 0]]``: rows go down, columns go along -x). Some writers (CDTools) store the
transpose, (3, 2); both are read.

Our ``position`` is the probe centre in the sample frame, (y, x) along the rows and
columns of the images: the probe sits at ``-translation`` relative to the sample,
so ``position_row = -translation . u_row`` and ``position_col = -translation .
u_col`` with ``u_row``, ``u_col`` the unit basis vectors of the detector's rows and
columns (the object image shares the detector's orientation in both far field and
near field: neither a Fraunhofer nor a Fresnel propagation inverts it). With the
default basis this is simply ``position = (translation_y, translation_x)``.
"""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import constants as _C

from ..errors import DatasetError
from ..radiation import fresnel_number, wavelength
from ..version import __version__
from .atomic import atomic_file

__all__ = ["read_cxi", "write_cxi", "read_cxi_result", "CXI_VERSION", "fresnel_number"]

CXI_VERSION = 160
_DET = "entry_1/instrument_1/detector_1"
_SRC = "entry_1/instrument_1/source_1"
_DATA_PATHS = (f"{_DET}/data", "entry_1/data_1/data")
_TRANSLATION_PATHS = ("entry_1/sample_1/geometry_1/translation", "entry_1/data_1/translation", f"{_DET}/translation")
_PROBE_PATHS = (f"{_SRC}/probe", "entry_1/probe_1/data", f"{_SRC}/illumination")
_CXI_PIXEL_HAS_SIGNAL = 0x1000  # the only mask bit that does not make a pixel bad
GEOMETRIES = ("auto", "far-field", "near-field")


# --------------------------------------------------------------------------- reading helpers


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a core dependency
        raise DatasetError("file", "reading CXI needs h5py: pip install h5py") from None
    return h5py


def _open(path):
    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DatasetError("file", f"{path} does not exist: give the path of a CXI (HDF5) file")
    if os.path.isdir(path):
        raise DatasetError("file", f"{path} is a directory; expected a CXI (HDF5) file")
    if not h5py.is_hdf5(path):
        raise DatasetError("file", f"{path} is not an HDF5 file; expected CXI 1.6 (HDF5)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError("file", f"{path} cannot be opened as HDF5 ({_first_line(e)})") from None


def _first_line(e):
    s = str(e)
    return s.splitlines()[0] if s else type(e).__name__


def _dataset(f, path):
    """The HDF5 dataset at ``path`` or None (a group there is an error)."""
    h5py = _h5py()
    if path not in f:
        return None
    obj = f[path]
    if not isinstance(obj, h5py.Dataset):
        raise DatasetError(path, "is an HDF5 group; expected a dataset")
    return obj


def _scalar(f, path, required=False, what="a positive number"):
    d = _dataset(f, path)
    if d is None:
        if required:
            raise DatasetError(path, f"missing from the CXI file; expected {what}")
        return None
    try:
        v = np.asarray(d[()], dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(path, f"has dtype {d.dtype}; expected {what}") from None
    if v.size == 0:
        raise DatasetError(path, f"is empty; expected {what}")
    if v.size > 1:  # a per-frame value (e.g. distance per image): must be constant
        if not np.allclose(v, v.flat[0], rtol=1e-6, atol=0):
            raise DatasetError(path, f"varies from frame to frame ({v.min():.6g} to {v.max():.6g}); expected one value")
    # float32 metadata (common in CXI files): keep the decimal value that was written (1.12, not 1.1200000047683716)
    v = float(str(v.flat[0].astype(np.float32))) if d.dtype == np.float32 else float(v.flat[0])
    if not np.isfinite(v):
        raise DatasetError(path, f"is {v}; expected {what}")
    return v


def _positive(path, v, what="a positive number"):
    if v is None or not v > 0:
        raise DatasetError(path, f"is {v!r}; expected {what}")
    return v


def _basis(f, px, py):
    """Detector basis vectors as rows (2, 3): step per row, step per column (metres)."""
    d = _dataset(f, f"{_DET}/basis_vectors")
    if d is None:
        return np.array([[0.0, -py, 0.0], [-px, 0.0, 0.0]]), False
    b = np.asarray(d[()], dtype=np.float64)
    if b.shape == (3, 2):  # CDTools writes the transpose of the spec's (dimension, coordinate)
        b = b.T
    if b.shape != (2, 3) or not np.isfinite(b).all():
        raise DatasetError(f"{_DET}/basis_vectors", f"has shape {b.shape}; expected (2, 3): one (x, y, z) step per detector axis")
    if np.linalg.norm(np.cross(b[0], b[1])) == 0:
        raise DatasetError(f"{_DET}/basis_vectors", "are parallel or zero; expected two independent pixel steps")
    return b, True


def _mask(f, shape):
    d = _dataset(f, f"{_DET}/mask")
    if d is None:
        return None, 0
    m = np.asarray(d[()])
    if m.shape != shape:
        raise DatasetError(f"{_DET}/mask", f"has shape {m.shape}; expected {shape} like the detector frames")
    if not np.issubdtype(m.dtype, np.integer) and m.dtype != np.bool_:
        raise DatasetError(f"{_DET}/mask", f"has dtype {m.dtype}; expected CXI's integer bit mask (0 = good pixel)")
    m = m.astype(np.uint32)
    # CXI: any bit set marks a pixel as not to be trusted, except "has signal" alone
    good = (m == 0) | (m == _CXI_PIXEL_HAS_SIGNAL)
    return good, int((~good).sum())


def _median_step(position):
    """Median nearest-neighbour distance between scan positions (metres)."""
    if len(position) < 2:
        return float("nan")
    from scipy.spatial import cKDTree

    d, _ = cKDTree(position).query(position, k=2)
    return float(np.median(d[:, 1]))


def _decide_geometry(requested, far_window_m, step_m, source_distance_m, recorded=None):
    """Far- or near-field, and why (see ``docs/format.md``).

    Parameters
    ----------
    requested : {"auto", "far-field", "near-field"}
        The caller's ``geometry``; anything but ``auto`` is taken as given.
    far_window_m : float
        The far-field real-space window ``lambda z / p``, metres.
    step_m : float
        Median scan step (NaN for a single position), metres.
    source_distance_m : float or None
        Focus-sample distance of a cone beam, metres.
    recorded : str, optional
        The geometry an earlier :func:`write_cxi` recorded; used under ``auto``.

    Returns
    -------
    geometry : str
        ``"far-field"`` or ``"near-field"``.
    reason : str
        One sentence for the ``geometry_reason`` attribute.
    """
    if requested != "auto":
        return requested, "given by the caller"
    if recorded in ("far-field", "near-field"):
        return recorded, "recorded by daskptycho when it wrote the file"
    if source_distance_m is not None:
        return "near-field", "a source-sample distance is given: a diverging (cone) beam imaged by Fresnel scaling"
    # Far-field ptychography needs the probe to fit half the real-space window lambda z / p
    # (twofold oversampling) and neighbouring probes to overlap: the step must be below that.
    if np.isfinite(step_m) and step_m > far_window_m / 2:
        return "near-field", (f"the median scan step {step_m:.3g} m exceeds half the far-field window "
                              f"lambda z / p = {far_window_m:.3g} m: far-field probes could not overlap")
    return "far-field", f"the median scan step {step_m:.3g} m fits within half the far-field window {far_window_m:.3g} m"


# --------------------------------------------------------------------------- readers, one per CXI group


def _read_frames(f):
    """The detector frames (``detector_1/data`` or ``data_1/data``) as cleaned counts.

    Parameters
    ----------
    f : h5py.File
        The open CXI file.

    Returns
    -------
    data_path : str
        The HDF5 path the frames were read from.
    counts : numpy.ndarray (J, Ny, Nx), float32
        The frames, converted chunk by chunk (bounded temporaries), NaN/inf set to 0
        and negative counts clipped.
    count_attrs : dict
        How many counts were zeroed or clipped (dataset attributes).

    Raises
    ------
    DatasetError
        No frames, or frames that are not a real (J, Ny, Nx) array.
    """
    from .importers import clean_counts

    data_path = next((p for p in _DATA_PATHS if p in f), None)
    if data_path is None:
        raise DatasetError(_DATA_PATHS[0], f"missing from the CXI file (nor {_DATA_PATHS[1]}); expected the (J, Ny, Nx) detector frames")
    d = _dataset(f, data_path)
    if d.ndim != 3 or 0 in d.shape:
        raise DatasetError(data_path, f"has shape {d.shape}; expected (J, Ny, Nx): one 2-D detector frame per scan position")
    if not (np.issubdtype(d.dtype, np.integer) or np.issubdtype(d.dtype, np.floating)):
        raise DatasetError(data_path, f"has dtype {d.dtype}; expected real counts")
    n_scan, ny, nx = d.shape
    counts = np.empty(d.shape, dtype=np.float32)
    step = max(1, (64 << 20) // max(ny * nx * d.dtype.itemsize, 1))
    for i in range(0, n_scan, step):  # bounded temporaries: convert chunk by chunk
        counts[i:i + step] = d[i:i + step]
    counts, count_attrs = clean_counts(counts)
    return data_path, counts, count_attrs


def _read_pixels(f):
    """Detector pixel size and basis vectors (``detector_1``).

    Either pixel size may be missing (the other, or the basis vectors' length, stands
    in); without basis vectors the CXI default basis is used.

    Parameters
    ----------
    f : h5py.File
        The open CXI file.

    Returns
    -------
    px, py : float
        Pixel width and height, metres (equal to a relative 1e-4).
    basis : numpy.ndarray (2, 3)
        The (x, y, z) step per detector row and per column, metres.

    Raises
    ------
    DatasetError
        No pixel size at all, a non-positive one, or non-square pixels.
    """
    px = _scalar(f, f"{_DET}/x_pixel_size")
    py = _scalar(f, f"{_DET}/y_pixel_size")
    basis, has_basis = _basis(f, px or 0.0, py or 0.0) if (px or py or f"{_DET}/basis_vectors" in f) else (None, False)
    if has_basis:
        px = px or float(np.linalg.norm(basis[1]))
        py = py or float(np.linalg.norm(basis[0]))
    if px is None and py is None:
        raise DatasetError(f"{_DET}/x_pixel_size", "missing (and no y_pixel_size or basis_vectors); expected the detector pixel width in metres")
    px, py = px or py, py or px
    _positive(f"{_DET}/x_pixel_size", px, "a positive pixel width in metres")
    _positive(f"{_DET}/y_pixel_size", py, "a positive pixel height in metres")
    if basis is None:
        basis, _ = _basis(f, px, py)
    if not np.isclose(px, py, rtol=1e-4):
        raise DatasetError(f"{_DET}/x_pixel_size", f"{px:.6g} m differs from y_pixel_size {py:.6g} m; only square pixels are supported")
    return px, py, basis


def _read_distance(f, basis):
    """Sample-detector distance (``detector_1/distance``, else from ``corner_position``).

    Parameters
    ----------
    f : h5py.File
        The open CXI file.
    basis : numpy.ndarray (2, 3)
        Detector basis vectors (:func:`_read_pixels`): the detector normal, along which
        the corner's distance is measured.

    Returns
    -------
    float
        The distance, metres.

    Raises
    ------
    DatasetError
        Neither distance nor a 3-vector corner position, or a non-positive distance.
    """
    distance = _scalar(f, f"{_DET}/distance")
    corner = _dataset(f, f"{_DET}/corner_position")
    if distance is None and corner is not None:
        c = np.asarray(corner[()], dtype=np.float64).reshape(-1)
        if c.size != 3:
            raise DatasetError(f"{_DET}/corner_position", f"has {c.size} values; expected (x, y, z) metres")
        normal = np.cross(basis[0], basis[1])
        distance = abs(float(c @ normal / np.linalg.norm(normal)))
    if distance is None:
        raise DatasetError(f"{_DET}/distance", "missing (and no corner_position); expected the sample-detector distance in metres")
    _positive(f"{_DET}/distance", distance, "a positive sample-detector distance in metres")
    return distance


def _read_beam(f, radiation):
    """Radiation, energy and wavelength of the beam (``source_1/{energy, wavelength}``).

    Parameters
    ----------
    f : h5py.File
        The open CXI file.
    radiation : {"xray", "electron"} or None
        The caller's; default what an earlier :func:`write_cxi` recorded, else ``"xray"``.

    Returns
    -------
    radiation : str
    energy_eV : float
        Photon energy or electron kinetic energy (eV); for X-rays it may come from the
        wavelength alone.
    wavelength_m : float
        From the file, else from the energy.

    Raises
    ------
    DatasetError
        An unknown radiation, neither energy nor wavelength (or no energy for
        electrons), a non-positive value, or an energy and a wavelength that disagree.
    """
    energy_j = _scalar(f, f"{_SRC}/energy")
    lam = _scalar(f, f"{_SRC}/wavelength")
    src = f[_SRC] if _SRC in f else None
    rad = radiation or (src.attrs.get("daskptycho_radiation") if src is not None else None) or "xray"
    if isinstance(rad, bytes):
        rad = rad.decode()
    if rad not in ("xray", "electron"):
        raise DatasetError("radiation", f"got {rad!r}; expected 'xray' or 'electron'")
    if energy_j is None and lam is None:
        raise DatasetError(f"{_SRC}/energy", "missing (and no wavelength); expected the photon energy in joules")
    if energy_j is not None:
        _positive(f"{_SRC}/energy", energy_j, "a positive energy in joules (CXI uses SI units)")
        energy_ev = energy_j / _C.e
        if lam is None:
            lam = wavelength(rad, energy_ev)
    _positive(f"{_SRC}/wavelength", lam, "a positive wavelength in metres")
    if energy_j is None:
        if rad != "xray":
            raise DatasetError(f"{_SRC}/energy", "missing; an electron beam's energy cannot be inferred here, store it in joules")
        energy_ev = _C.h * _C.c / lam / _C.e
    elif not np.isclose(lam, wavelength(rad, energy_ev), rtol=1e-3):
        raise DatasetError(f"{_SRC}/wavelength", f"{lam:.6g} m disagrees with energy {energy_ev:.6g} eV "
                           f"({wavelength(rad, energy_ev):.6g} m for {rad}); fix one of them")
    return rad, energy_ev, lam


def _read_source_distance(f, source_distance_m):
    """Focus (source) to sample distance of a cone beam (``source_1/distance``).

    Parameters
    ----------
    f : h5py.File
        The open CXI file.
    source_distance_m : float or None
        The caller's value, which overrides the file's.

    Returns
    -------
    float or None
        The distance, metres (CXI's negative upstream distance made positive), or None
        when neither gives one (a plane wave).

    Raises
    ------
    DatasetError
        The file's distance is zero.
    """
    z1 = source_distance_m
    if z1 is None:
        z1 = _scalar(f, f"{_SRC}/distance")
        if z1 is not None:
            z1 = abs(z1)  # CXI: components upstream of the sample have negative distances
            _positive(f"{_SRC}/distance", z1, "a non-zero source-sample distance in metres")
    return z1


def _read_translation(f, n_scan, data_path):
    """Sample translations (``sample_1/geometry_1/translation`` or the other CXI places).

    Parameters
    ----------
    f : h5py.File
        The open CXI file.
    n_scan : int
        Number of frames: one translation each.
    data_path : str
        Where the frames were read (for messages).

    Returns
    -------
    numpy.ndarray (J, 3), float64
        (x, y, z) per frame, metres (z = 0 where the file gives (x, y) only).

    Raises
    ------
    DatasetError
        No translations, the wrong shape or count, or non-finite values.
    """
    tpath = next((p for p in _TRANSLATION_PATHS if p in f), None)
    if tpath is None:
        raise DatasetError(_TRANSLATION_PATHS[0], "missing from the CXI file; expected (J, 3) sample translations (x, y, z) in metres")
    t = np.asarray(_dataset(f, tpath)[()], dtype=np.float64)
    if t.ndim != 2 or t.shape[1] not in (2, 3) or t.shape[0] != n_scan:
        raise DatasetError(tpath, f"has shape {t.shape}; expected ({n_scan}, 3): one (x, y, z) translation per frame of {data_path}")
    if not np.isfinite(t).all():
        raise DatasetError(tpath, "contains NaN or inf; expected finite translations in metres")
    if t.shape[1] == 2:
        t = np.column_stack([t, np.zeros(n_scan)])
    return t


def _read_probe(f, shape):
    """An optional probe (``source_1/probe``, ``probe_1/data`` or ``source_1/illumination``).

    Parameters
    ----------
    f : h5py.File
        The open CXI file.
    shape : (int, int)
        (Ny, Nx) of the frames, which the probe must match.

    Returns
    -------
    probe : numpy.ndarray (K, Ny, Nx) complex64 or None
    path : str or None
        Where it was read.

    Raises
    ------
    DatasetError
        A probe of the wrong shape or with non-finite values.
    """
    ny, nx = shape
    ppath = next((p for p in _PROBE_PATHS if p in f), None)
    if ppath is None:
        return None, None
    probe = np.asarray(_dataset(f, ppath)[()])
    if probe.ndim not in (2, 3) or probe.shape[-2:] != (ny, nx):
        raise DatasetError(ppath, f"has shape {probe.shape}; expected ({ny}, {nx}) or (K, {ny}, {nx}) like the frames")
    if not np.isfinite(probe).all():
        raise DatasetError(ppath, "contains NaN or inf; expected a finite probe")
    return probe.astype(np.complex64).reshape((-1, ny, nx)), ppath


def _read_entry(f):
    """The file's ``cxi_version`` and the attributes an earlier :func:`write_cxi` kept.

    Parameters
    ----------
    f : h5py.File
        The open CXI file.

    Returns
    -------
    cxi_version : float or None
    extra_attrs : dict
        ``entry_1``'s ``daskptycho_attrs`` (JSON), empty for a foreign file or an
        unreadable record.
    """
    cxi_version = _scalar(f, "cxi_version")
    extra_attrs = {}
    if "entry_1" in f and "daskptycho_attrs" in f["entry_1"].attrs:
        try:
            extra_attrs = json.loads(f["entry_1"].attrs["daskptycho_attrs"])
        except (TypeError, ValueError):
            extra_attrs = {}
    return cxi_version, extra_attrs


# --------------------------------------------------------------------------- from the file's values to a dataset


def _positions(translation, basis):
    """Probe centres (J, 2) in the image frame, metres: ``-translation`` projected on the
    detector's row and column directions (see the module docstring)."""
    u = basis / np.linalg.norm(basis, axis=1, keepdims=True)
    return np.column_stack([-translation @ u[0], -translation @ u[1]])


def _sampling(geometry, shape, px, py, wavelength_m, distance_m, source_distance_m, step_m, data_path):
    """Real-space pixel of the reconstruction and the geometry's attributes.

    Parameters
    ----------
    geometry : {"far-field", "near-field"}
    shape : (int, int)
        (Ny, Nx) of the frames.
    px, py : float
        Detector pixel width and height, metres.
    wavelength_m, distance_m : float
        Wavelength and sample-detector distance, metres.
    source_distance_m : float or None
        Focus-sample distance of a cone beam (near field), metres.
    step_m : float
        Median scan step, metres (for the plane-wave note).
    data_path : str
        Where the frames were read (for messages).

    Returns
    -------
    pixel_size_m : float
        Near field: ``p / M`` with ``M = (z1 + z2) / z1`` (1 for a plane wave); far
        field: ``lambda z / (N p)``.
    attrs : dict
        ``fresnel_number`` and, in the near field, ``magnification``,
        ``effective_distance_m``, ``fresnel_number_pixel`` and ``source_distance_m``
        or ``geometry_note``.

    Raises
    ------
    DatasetError
        Far field with frames whose real-space pixels would differ along y and x.
    """
    ny, nx = shape
    p = float(px)
    lam, distance, z1 = wavelength_m, distance_m, source_distance_m
    attrs = {}
    if geometry == "near-field":
        mag = 1.0 if z1 is None else (z1 + distance) / z1
        dx = p / mag
        z_eff = distance / mag
        attrs.update({"magnification": mag, "effective_distance_m": z_eff})
        if z1 is None:
            attrs["geometry_note"] = (
                f"plane wave assumed (the file gives no source-sample distance, so the real-space pixel is the detector pixel "
                f"{p:.3g} m); the median scan step is {step_m / dx:.3g} detector pixels: if the beam diverges from a focus, "
                "import it again with the focus-sample distance (source_distance_m in Python, --source-distance on the command line)")
        else:
            attrs["source_distance_m"] = float(z1)
        # the illuminated field of a near-field hologram is at most the detector's field, seen in the sample plane
        attrs["fresnel_number"] = fresnel_number(max(ny, nx) * dx, lam, z_eff)
        attrs["fresnel_number_pixel"] = fresnel_number(dx, lam, z_eff)
    else:
        if ny * py != nx * px and not np.isclose(ny * py, nx * px, rtol=1e-6):
            raise DatasetError(data_path, f"frames of {ny}x{nx} give different real-space pixels along y and x; expected square frames")
        dx = lam * distance / (nx * p)
        # the largest probe the sampling allows fills half the window lambda z / p
        attrs["fresnel_number"] = fresnel_number(lam * distance / p / 2, lam, distance)
    return dx, attrs


def _rescaled_probe(probe, counts):
    """A foreign probe brought to the scale of ``sqrt(counts)`` (ours already is).

    Parameters
    ----------
    probe : numpy.ndarray (K, Ny, Nx) complex64
    counts : numpy.ndarray (J, Ny, Nx)

    Returns
    -------
    probe : numpy.ndarray (K, Ny, Nx) complex64
        Its total power equal to the mean counts per frame.
    scale : float
        The factor applied (1 for a dark probe or dark frames).
    """
    mean_counts = float(counts.sum(axis=(1, 2), dtype=np.float64).mean())
    power = float(np.sum(np.abs(probe.astype(np.complex128)) ** 2))
    scale = np.sqrt(mean_counts / power) if power > 0 and mean_counts > 0 else 1.0
    return (probe * np.float32(scale)).astype(np.complex64), float(scale)


# --------------------------------------------------------------------------- read_cxi


def read_cxi(path, *, geometry: str = "auto", source_distance_m: float | None = None, radiation: str | None = None):
    """Read a ptychography CXI 1.6 file into the daskptycho dataset format.

    Parameters
    ----------
    path : str or path-like
        The ``.cxi`` (HDF5) file. Read: ``entry_1/instrument_1/detector_1/data`` (or
        ``entry_1/data_1/data``), (J, Ny, Nx) counts; ``detector_1/{mask, distance,
        x_pixel_size, y_pixel_size, basis_vectors, corner_position}``;
        ``source_1/{energy (J), wavelength (m), distance}``;
        ``sample_1/geometry_1/translation`` (J, 3) metres; an optional probe
        (``source_1/probe``, ``entry_1/probe_1/data`` or ``source_1/illumination``).
    geometry : {"auto", "far-field", "near-field"}
        ``auto`` decides from the file (see ``docs/format.md``): near-field when a
        source-sample distance is known, or when the scan steps are too long for
        overlapping far-field probes.
    source_distance_m : float, optional
        Distance from the beam's focus (source) to the sample, metres, for a cone-beam
        near-field geometry; overrides ``source_1/distance``. The detector is then
        seen through the Fresnel scaling theorem: magnification ``M = (z1 + z2) / z1``,
        real-space pixel ``p / M``, effective distance ``z2 / M``.
    radiation : {"xray", "electron"}, optional
        Default: what an earlier :func:`write_cxi` recorded, else ``"xray"``.

    Returns
    -------
    xarray.Dataset
        ``intensity`` (J, Ny, Nx) float32, ``position`` (J, 2) metres, optional
        ``mask`` and ``probe``; attributes ``geometry``, ``detector_distance_m``,
        ``detector_pixel_size_m``, ``fresnel_number``, ``pixel_size_m`` (far field:
        ``lambda z / (N p)``; near field: ``p / M``) and the others of
        ``docs/format.md``.

    Raises
    ------
    DatasetError
        Naming the HDF5 path that is missing or malformed (or ``file``).
    """
    from .store import build_dataset, validate_dataset

    if geometry not in GEOMETRIES:
        raise DatasetError("geometry", f"got {geometry!r}; expected one of {', '.join(GEOMETRIES)}")
    if source_distance_m is not None:
        _positive("source_distance_m", source_distance_m, "a positive distance in metres")
    with _open(path) as f:
        data_path, counts, count_attrs = _read_frames(f)
        n_scan, ny, nx = counts.shape
        mask, n_bad = _mask(f, (ny, nx))
        px, py, basis = _read_pixels(f)
        distance = _read_distance(f, basis)
        rad, energy_ev, lam = _read_beam(f, radiation)
        z1 = _read_source_distance(f, source_distance_m)
        translation = _read_translation(f, n_scan, data_path)
        probe, ppath = _read_probe(f, (ny, nx))
        cxi_version, extra_attrs = _read_entry(f)

    position = _positions(translation, basis)
    step = _median_step(position)
    geom, why = _decide_geometry(geometry, lam * distance / float(px), step, z1, recorded=extra_attrs.get("geometry"))
    attrs = {
        "geometry": geom,
        "geometry_reason": why,
        "detector_distance_m": float(distance),
        "detector_pixel_size_m": float(px),
        "source_file": os.path.basename(os.fspath(path)),
        "importer": "daskptycho.io.cxi.read_cxi",
        "cxi_data_path": data_path,
        "mask_pixels_flagged": n_bad,
        **count_attrs,
    }
    if cxi_version is not None:
        attrs["cxi_version"] = int(cxi_version)
    dx, geometry_attrs = _sampling(geom, (ny, nx), px, py, lam, distance, z1, step, data_path)
    attrs.update(geometry_attrs)
    if probe is not None and not extra_attrs:  # a foreign probe: bring it to sqrt(counts); ours already is
        probe, attrs["probe_rescaled_by"] = _rescaled_probe(probe, counts)
    if probe is not None:
        attrs["cxi_probe_path"] = ppath
    for key, value in extra_attrs.items():  # what an earlier write_cxi kept (e.g. probe-forming parameters)
        attrs.setdefault(key, value)
    ds = build_dataset(counts, position, radiation=rad, energy_eV=float(energy_ev), wavelength_m=float(lam),
                       pixel_size_m=float(dx), mask=mask, probe=probe, attrs=attrs)
    validate_dataset(ds, check_values=True)
    return ds


# --------------------------------------------------------------------------- writing


def _atomic_h5(path, overwrite, fill):
    """Write an HDF5 file with ``fill(h5file)`` under a temporary name, then rename."""
    h5py = _h5py()
    with atomic_file(path, overwrite) as tmp, h5py.File(tmp, "w") as f:
        fill(f)
    return os.fspath(path)


def _put(group, name, value, **attrs):
    d = group.create_dataset(name, data=value)
    for k, v in attrs.items():
        d.attrs[k] = v
    return d


def _write_header(f):
    _put(f, "cxi_version", np.int64(CXI_VERSION))
    _put(f, "number_of_entries", np.int64(1))
    e = f.create_group("entry_1")
    _put(e, "program_name", f"daskptycho {__version__}")
    return e


def _detector_geometry(attrs, n):
    """Sample-detector distance and detector pixel (metres), and whether they are nominal.

    A far-field store without them (simulations) gets a nominal 1 m distance and the
    pixel that reproduces its real-space pixel: ``p = lambda z / (N dx)``."""
    z = attrs.get("detector_distance_m")
    p = attrs.get("detector_pixel_size_m")
    if z and p:
        return float(z), float(p), False
    z = 1.0
    return z, float(attrs["wavelength_m"]) * z / (n * float(attrs["pixel_size_m"])), True


def _write_source(inst, attrs):
    s = inst.create_group("source_1")
    e_j = float(attrs["energy_eV"]) * _C.e
    _put(s, "energy", np.float64(e_j), units="J")
    _put(s, "wavelength", np.float64(attrs["wavelength_m"]), units="m")
    s.attrs["daskptycho_radiation"] = str(attrs.get("radiation", "xray"))
    if attrs.get("source_distance_m"):
        _put(s, "distance", np.float64(-float(attrs["source_distance_m"])), units="m")
    return s


def _write_detector(inst, attrs, n, description=None):
    z, p, nominal = _detector_geometry(attrs, n)
    d = inst.create_group("detector_1")
    _put(d, "distance", np.float64(z), units="m")
    _put(d, "x_pixel_size", np.float64(p), units="m")
    _put(d, "y_pixel_size", np.float64(p), units="m")
    _put(d, "basis_vectors", np.array([[0.0, -p, 0.0], [-p, 0.0, 0.0]]), units="m")
    if nominal:
        _put(d, "description", "nominal geometry: distance 1 m chosen, the pixel size follows from the real-space pixel "
             "lambda z / (N p) of the daskptycho store")
    elif description:
        _put(d, "description", description)
    return d


def _translation(position):
    # the inverse of read_cxi's mapping for the default basis: translation (x, y, z) = (pos_x, pos_y, 0)
    pos = np.asarray(position, dtype=np.float64)
    return np.column_stack([pos[:, 1], pos[:, 0], np.zeros(len(pos))])


def _json_attrs(attrs, skip=()):
    keep = {}
    for k, v in attrs.items():
        if k in skip:
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        keep[k] = v
    return json.dumps(keep)


def write_cxi(store, path, *, overwrite: bool = False, dataset=None):
    """Export a result or a dataset as a CXI 1.6 file (atomically).

    Parameters
    ----------
    store : xarray.Dataset or str or path-like
        A result (``object`` ...) or a dataset (``intensity`` ...), in memory or the
        path of its Zarr store.
    path : str or path-like
        The ``.cxi`` file to write.
    overwrite : bool
        Replace an existing file.
    dataset : xarray.Dataset or path, optional
        For a result: the dataset it was reconstructed from (positions and detector
        geometry). Default: the result's ``input_store`` when that store exists.

    Notes
    -----
    A result gives ``entry_1/image_1/data`` = the object (Y, X) complex64, or
    (S, Y, X) with ``axes = "z:y:x"`` for several slices; ``image_1/{x, y, z}``
    coordinates in metres; ``image_1/data_type = "amplitude"``, ``data_space =
    "real"``; ``entry_1/instrument_1/source_1/probe`` (K, N, N) with
    ``probe_power_fraction``; ``entry_1/result_1/data`` = the cost per iteration;
    ``image_1/process_1`` = program, version and options; and, from the input
    dataset, ``sample_1/geometry_1/translation`` and the detector geometry.
    A dataset gives ``instrument_1/detector_1/{data, mask, distance, x_pixel_size,
    y_pixel_size, basis_vectors}`` (``data_1/data`` links to the frames), the source
    and the translations. Every file has ``cxi_version = 160``.
    """
    from .store import RESULT_FORMAT_NAME, open_dataset, open_zarr

    if not hasattr(store, "data_vars"):
        store = open_zarr(store)
    is_result = store.attrs.get("format") == RESULT_FORMAT_NAME or "object" in store
    if not is_result and "intensity" not in store:
        raise DatasetError("store", "holds neither 'object' (a result) nor 'intensity' (a dataset); nothing to export to CXI")
    if is_result:
        src = dataset
        if src is None:
            inp = store.attrs.get("input_store")
            if inp and os.path.isdir(inp):
                src = inp
        if src is not None and not hasattr(src, "data_vars"):
            src = open_dataset(src, check_values=False)
        return _atomic_h5(path, overwrite, lambda f: _fill_result(f, store, src))
    return _atomic_h5(path, overwrite, lambda f: _fill_dataset(f, store))


def _fill_result(f, res, src):
    e = _write_header(f)
    obj = np.asarray(res["object"].values, dtype=np.complex64)
    img = e.create_group("image_1")
    y = np.asarray(res["y"].values, dtype=np.float64)
    x = np.asarray(res["x"].values, dtype=np.float64)
    if obj.shape[0] == 1:
        d = _put(img, "data", obj[0], axes="y:x")
        _put(img, "dimensionality", np.int64(2))
    else:
        d = _put(img, "data", obj, axes="z:y:x")
        _put(img, "z", np.asarray(res["z"].values, dtype=np.float64), units="m")
        _put(img, "dimensionality", np.int64(3))
    d.attrs["long_name"] = "complex transmission function"
    _put(img, "y", y, units="m")
    _put(img, "x", x, units="m")
    _put(img, "data_type", "amplitude")
    _put(img, "data_space", "real")
    dx = float(res.attrs["pixel_size_m"])
    _put(img, "image_size", np.array([x.size * dx, y.size * dx, 0.0]), units="m")
    proc = img.create_group("process_1")
    _put(proc, "program", "daskptycho")
    _put(proc, "version", str(res.attrs.get("daskptycho_version", __version__)))
    _put(proc, "comments", f"engine {res.attrs.get('engine')}; options {res.attrs.get('options', '{}')}")
    inst = e.create_group("instrument_1")
    attrs = dict(src.attrs) if src is not None else dict(res.attrs)
    s = _write_source(inst, {**res.attrs, **attrs})
    _put(s, "probe", np.asarray(res["probe"].values, dtype=np.complex64), axes="mode:y:x")
    if "probe_power_fraction" in res:
        _put(s, "probe_power_fraction", np.asarray(res["probe_power_fraction"].values, dtype=np.float64))
    n = int(res.sizes["px"])
    if src is not None:
        _write_detector(inst, attrs, n)
        g = e.create_group("sample_1").create_group("geometry_1")
        _put(g, "translation", _translation(src["position"].values), units="m")
    r = e.create_group("result_1")
    _put(r, "data", np.asarray(res["cost"].values, dtype=np.float64), units="counts")
    _put(r, "description", "cost per iteration, measured before that iteration's update")
    e.attrs["daskptycho_attrs"] = _json_attrs(res.attrs)


def _fill_dataset(f, ds):
    e = _write_header(f)
    inst = e.create_group("instrument_1")
    _write_source(inst, ds.attrs)
    n = int(ds.sizes["kx"])
    det = _write_detector(inst, ds.attrs, n)
    inten = ds["intensity"]
    d = det.create_dataset("data", shape=inten.shape, dtype=np.float32, chunks=(1, *inten.shape[1:]))
    d.attrs["axes"] = "translation:y:x"
    data = inten.data
    if hasattr(data, "to_delayed"):  # stream the frames chunk by chunk, never the whole stack
        start = 0
        for block in data.blocks:
            arr = np.asarray(block.compute())
            d[start:start + arr.shape[0]] = arr
            start += arr.shape[0]
    else:
        d[...] = np.asarray(data, dtype=np.float32)
    if "mask" in ds:
        _put(det, "mask", np.where(np.asarray(ds["mask"].values, dtype=bool), 0, 1).astype(np.uint32))
    e.create_group("data_1")["data"] = _h5py().SoftLink(f"/{_DET}/data")
    g = e.create_group("sample_1").create_group("geometry_1")
    _put(g, "translation", _translation(ds["position"].values), units="m")
    if "probe" in ds:
        _put(inst["source_1"], "probe", np.asarray(ds["probe"].values, dtype=np.complex64), axes="mode:y:x")
    skip = {"source", "format", "format_version", "radiation", "energy_eV", "wavelength_m", "pixel_size_m",
            "detector_distance_m", "detector_pixel_size_m", "geometry_reason", "importer", "source_file"}
    e.attrs["daskptycho_attrs"] = _json_attrs(ds.attrs, skip)


# --------------------------------------------------------------------------- reading our exports back


def read_cxi_result(path):
    """Read the object, probe and cost of a CXI file written by :func:`write_cxi`.

    Returns
    -------
    xarray.Dataset
        ``object`` (slice, y, x) complex64, ``probe`` (mode, py, px) complex64,
        ``cost`` (iteration) and, when the file has translations, ``position``
        (scan, yx) metres; attributes ``wavelength_m``, ``energy_eV``,
        ``pixel_size_m``.
    """
    import xarray as xr

    with _open(path) as f:
        d = _dataset(f, "entry_1/image_1/data")
        if d is None:
            raise DatasetError("entry_1/image_1/data", "missing from the CXI file; expected the reconstructed object")
        obj = np.asarray(d[()]).astype(np.complex64)
        if obj.ndim == 2:
            obj = obj[None]
        if obj.ndim != 3:
            raise DatasetError("entry_1/image_1/data", f"has shape {obj.shape}; expected (Y, X) or (S, Y, X)")
        coords = {}
        for name, size in (("y", obj.shape[1]), ("x", obj.shape[2])):
            c = _dataset(f, f"entry_1/image_1/{name}")
            coords[name] = np.asarray(c[()], dtype=np.float64) if c is not None else np.arange(size, dtype=np.float64)
        data = {"object": (("slice", "y", "x"), obj, {"units": "1"})}
        p = next((_dataset(f, q) for q in _PROBE_PATHS if q in f), None)
        if p is not None:
            probe = np.asarray(p[()]).astype(np.complex64)
            data["probe"] = (("mode", "py", "px"), probe.reshape((-1, *probe.shape[-2:])), {"units": "sqrt(counts)"})
        c = _dataset(f, "entry_1/result_1/data")
        if c is not None:
            data["cost"] = (("iteration",), np.asarray(c[()], dtype=np.float64), {"units": "counts"})
        t = next((_dataset(f, q) for q in _TRANSLATION_PATHS if q in f), None)
        if t is not None:
            tr = np.asarray(t[()], dtype=np.float64)
            data["position"] = (("scan", "yx"), np.column_stack([tr[:, 1], tr[:, 0]]), {"units": "m"})
            coords["yx"] = np.array(["y", "x"], dtype=object)
        attrs = {}
        lam = _scalar(f, f"{_SRC}/wavelength")
        energy = _scalar(f, f"{_SRC}/energy")
        if lam is not None:
            attrs["wavelength_m"] = lam
        if energy is not None:
            attrs["energy_eV"] = energy / _C.e
        if obj.shape[2] > 1:
            attrs["pixel_size_m"] = float(coords["x"][1] - coords["x"][0])
    return xr.Dataset(data, coords=coords, attrs=attrs)
