"""Importers: measured data in other layouts -> the daskptycho dataset format.

Both importers return an in-memory :class:`xarray.Dataset` that passes
:func:`daskptycho.io.validate_dataset`; write it with :func:`daskptycho.write_dataset`.
Files are read with ``allow_pickle=False`` always: a file holding Python objects is
refused with a :class:`~daskptycho.errors.DatasetError`, never unpickled.

:func:`import_siemens_star`
    The Tike test data set ``siemens-star-small.npz.bz2`` (and any npz in the same
    layout: keys ``data``, ``scan``, ``probe``). What the file holds and what is done
    with it:

    - ``data`` float32 (1, J, N, N): photon counts in FFT order (the bright field at
      the corners) -> ``intensity`` (J, N, N), fftshifted over the last two axes so
      zero frequency is at pixel ``(N//2, N//2)``. Negative counts are clipped to 0 and
      NaN/inf set to 0; how many is recorded in the attributes ``negative_counts_clipped``
      and ``nonfinite_counts_zeroed`` (both 0 for the Siemens-star file). The patterns
      of that file are those of a zone plate with a central stop: the mean pattern is a
      bright annulus around a dim central disc, centred after the shift.
    - ``scan`` float32 (1, J, 2): positions in pixels (row, column), centred on zero.
      In Tike they are the minimum corner of each probe window; the format wants the
      probe centre (window pixel ``N//2``), so
      ``position = (scan - scan.min(axis=0) + N//2) * pixel_size_m`` (y = row, x =
      column): non-negative, the first window corner at 0. The constant shift does not
      change a reconstruction (the grid follows the positions); it is recorded as
      ``position_shift_px`` (added to ``scan``).
    - ``probe`` complex64 (1, 1, 1, K, N, N) -> ``probe`` (K, N, N). The file's probe is
      already centred in real space (intensity peak at pixel (48, 64), power-weighted
      centre (61.9, 64.6) for N = 128), so it is stored as is; a probe in FFT order
      (more power in the corners than in the central half-window) would be
      fftshifted (attribute ``probe_fftshifted``). It is rescaled to the format's unit
      sqrt(counts): ``sum |P|^2`` equals the mean total counts of a pattern (the factor
      applied to the amplitude is ``probe_rescaled_by``).
    - The file has no photon energy, detector distance or pixel size: ``pixel_size_m``
      and ``energy_eV`` are nominal (attribute ``geometry_nominal``); ``wavelength_m``
      follows from the energy. Lengths are therefore "pixels times pixel_size_m".

:func:`import_npz`
    A generic ``.npz`` (or ``.npy``, optionally ``.bz2``-compressed) with documented keys.
"""

from __future__ import annotations

import bz2
import io
import os
import zipfile

import numpy as np

from ..errors import DatasetError
from ..radiation import xray_wavelength
from .store import build_dataset, check_intensity, validate_dataset

__all__ = ["import_siemens_star", "import_npz", "NPZ_KEYS"]

TIKE_LICENCE = "Tike test data, UChicago Argonne, BSD-3-style; see LICENSE-tike.txt"
GEOMETRY_NOMINAL = "pixel units: pixel_size_m and energy_eV are nominal, not measured"

#: keys of the generic npz layout (see :func:`import_npz`)
NPZ_KEYS = {
    "intensity": "required, (J, N, N) counts, zero frequency at pixel (N//2, N//2) (or fft_order=True)",
    "position": "required, (J, 2) probe centres (y, x) in metres",
    "mask": "optional, (N, N) bool, True = valid pixel (same order as intensity)",
    "probe": "optional, (N, N) or (K, N, N) complex probe guess, centre at pixel N//2",
}
_REQUIRED_ATTRS = ("radiation", "energy_eV", "pixel_size_m")


# --------------------------------------------------------------------------- reading


def _read_arrays(path, keys=None):
    """All arrays of an ``.npz``/``.npy`` (optionally ``.bz2``), without ever unpickling.

    Returns a dict name -> array (an ``.npy`` gives ``{"intensity": array}``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DatasetError("file", f"{path} does not exist: give the path of an .npz or .npy file")
    if os.path.isdir(path):
        raise DatasetError("file", f"{path} is a directory; expected an .npz or .npy file")
    try:
        with open(path, "rb") as raw:
            # np.load seeks in a zip archive; seeking backwards in a bz2 stream means
            # decompressing again from the start, so decompress once into memory
            f = io.BytesIO(bz2.decompress(raw.read())) if path.endswith(".bz2") else raw
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return {"intensity": loaded}
            out = {}
            with loaded:
                for name in loaded.files:
                    try:
                        out[name] = loaded[name]
                    except ValueError as e:
                        if "allow_pickle" in str(e) or "Object arrays" in str(e):
                            raise DatasetError(name, f"holds Python objects (an object array) in {os.path.basename(path)}; "
                                               "expected plain numeric arrays (pickled data is never loaded)") from None
                        raise
            return out
    except DatasetError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise DatasetError("file", f"{path} holds Python objects (a pickle or object array); expected plain numeric "
                               "arrays (pickled data is never loaded)") from None
        raise DatasetError("file", f"{path} cannot be read as .npz/.npy ({type(e).__name__}: {_first_line(e)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DatasetError("file", f"{path} cannot be read as .npz/.npy ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e):
    s = str(e)
    return s.splitlines()[0] if s else type(e).__name__


def clean_counts(data):
    """float32 counts with NaN/inf set to 0 and negatives clipped; and how many of each."""
    data = np.asarray(data, dtype=np.float32)
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        data = np.where(bad, np.float32(0), data)
    neg = data < 0
    n_neg = int(neg.sum())
    if n_neg:
        data = np.where(neg, np.float32(0), data)
    return data, {"negative_counts_clipped": n_neg, "nonfinite_counts_zeroed": n_bad}


def _squeeze_leading(arr, keep, name, what):
    """Drop leading singleton axes so ``arr`` has ``keep`` axes; refuse non-singleton ones."""
    arr = np.asarray(arr)
    if arr.ndim < keep:
        raise DatasetError(name, f"has shape {arr.shape}; expected {what}")
    lead = arr.shape[:arr.ndim - keep]
    if any(v != 1 for v in lead):
        raise DatasetError(name, f"has shape {arr.shape}; expected {what} (leading axes of length 1 only: "
                           "one rotation angle per import)")
    return arr.reshape(arr.shape[arr.ndim - keep:])


def _centred_probe(probe):
    """The probe with its centre at pixel N//2: fftshifted if it is in FFT order.

    A probe is taken to be in FFT order when the central half-window holds less of its
    power than the same box after an fftshift (the corners)."""
    p = np.abs(probe) ** 2
    if p.ndim == 3:
        p = p.sum(axis=0)
    ny, nx = p.shape
    box = (slice(ny // 4, ny - ny // 4), slice(nx // 4, nx - nx // 4))
    centre = p[box].sum()
    corners = np.fft.fftshift(p)[box].sum()
    if corners > centre:
        return np.fft.fftshift(probe, axes=(-2, -1)), True
    return probe, False


# --------------------------------------------------------------------------- Siemens star (Tike)


def import_siemens_star(path, pixel_size_m: float = 1e-8, energy_eV: float = 8.8e3):
    """Import the Tike Siemens-star test data (``siemens-star-small.npz.bz2``).

    Parameters
    ----------
    path : str or path-like
        The ``.npz.bz2`` (or ``.npz``) file with keys ``data`` (1, J, N, N) counts in FFT
        order, ``scan`` (1, J, 2) positions in pixels (row, column) and ``probe``
        (1, 1, 1, K, N, N) complex.
    pixel_size_m : float
        Nominal real-space pixel size (the file gives none), metres.
    energy_eV : float
        Nominal photon energy (the file gives none), eV.

    Returns
    -------
    xarray.Dataset
        ``intensity`` (J, N, N) centred, ``position`` (J, 2) metres, ``probe`` (K, N, N)
        in sqrt(counts); radiation ``"xray"``. See the module docstring for every
        conversion and the attributes that record it.

    Raises
    ------
    DatasetError
        Naming the missing key (``data``, ``scan``, ``probe``) or the array whose shape
        disagrees with the others, or ``file`` when it cannot be read.
    """
    for name, v in (("pixel_size_m", pixel_size_m), ("energy_eV", energy_eV)):
        _check_positive(name, v)
    arrays = _read_arrays(path)
    for key in ("data", "scan", "probe"):
        if key not in arrays:
            raise DatasetError(key, f"missing from {os.path.basename(os.fspath(path))} (it holds {sorted(arrays)}); "
                               "expected the Tike layout: data (1, J, N, N), scan (1, J, 2), probe (1, 1, 1, K, N, N)")
    data = _squeeze_leading(arrays["data"], 3, "data", "(1, J, N, N) diffraction patterns")
    scan = _squeeze_leading(arrays["scan"], 2, "scan", "(1, J, 2) positions in pixels")
    probe = _squeeze_leading(arrays["probe"], 3, "probe", "(1, 1, 1, K, N, N) complex probe")
    j, ny, nx = data.shape
    if j == 0 or ny == 0 or nx == 0:
        raise DatasetError("data", f"is empty (shape {arrays['data'].shape}); expected at least one pattern")
    if scan.shape != (j, 2):
        raise DatasetError("scan", f"has shape {arrays['scan'].shape}; expected (1, {j}, 2): one (row, column) per pattern of data")
    if probe.shape[-2:] != (ny, nx) or probe.shape[0] < 1:
        raise DatasetError("probe", f"has shape {arrays['probe'].shape}; expected (1, 1, 1, K, {ny}, {nx}) like the patterns of data")
    if not np.iscomplexobj(probe):
        probe = probe.astype(np.complex64)
    if not np.isfinite(scan).all():
        raise DatasetError("scan", "contains NaN or inf; expected finite positions in pixels")
    if not np.isfinite(probe).all():
        raise DatasetError("probe", "contains NaN or inf; expected a finite complex probe")

    counts, count_attrs = clean_counts(data)
    intensity = np.fft.fftshift(counts, axes=(-2, -1))  # FFT order -> zero frequency at N//2

    # Tike: minimum corner of the probe window; the format: the probe centre (pixel N//2)
    scan = scan.astype(np.float64)
    shift = np.array([ny // 2, nx // 2], dtype=np.float64) - scan.min(axis=0)
    position = (scan + shift) * pixel_size_m

    probe, shifted = _centred_probe(probe.astype(np.complex64))
    mean_counts = float(intensity.sum(axis=(1, 2), dtype=np.float64).mean())
    power = float(np.sum(np.abs(probe.astype(np.complex128)) ** 2))
    scale = np.sqrt(mean_counts / power) if power > 0 and mean_counts > 0 else 1.0
    probe = (probe * np.float32(scale)).astype(np.complex64)

    lam = xray_wavelength(energy_eV)
    attrs = {
        "geometry": "far-field",
        "geometry_nominal": GEOMETRY_NOMINAL,
        "licence": TIKE_LICENCE,
        "source_file": os.path.basename(os.fspath(path)),
        "importer": "daskptycho.io.importers.import_siemens_star",
        "position_shift_px": [float(v) for v in shift],
        "probe_fftshifted": bool(shifted),
        "probe_rescaled_by": float(scale),
        **count_attrs,
    }
    ds = build_dataset(intensity, position, radiation="xray", energy_eV=energy_eV, wavelength_m=lam,
                       pixel_size_m=pixel_size_m, probe=probe, attrs=attrs)
    validate_dataset(ds, check_values=True)
    return ds


# --------------------------------------------------------------------------- generic npz


def _check_positive(name, v, field=None):
    try:
        ok = not isinstance(v, (bool, str)) and np.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DatasetError(field or name, f"got {v!r}; expected a positive number")


def _scalar(value):
    """A Python scalar from a 0-d array (str for strings)."""
    v = np.asarray(value).item()
    return v.decode() if isinstance(v, bytes) else v


def import_npz(path, *, fft_order: bool = False, position=None, mask=None, probe=None, **attrs):
    """Import a generic ``.npz`` (or ``.npy``) file into the daskptycho format.

    Keys of the file (see :data:`NPZ_KEYS`):

    - ``intensity`` (required): (J, N, N) counts, zero frequency at pixel
      ``(N//2, N//2)``; pass ``fft_order=True`` if it is in FFT order (zero frequency at
      ``[0, 0]``) and it (and ``mask``) are fftshifted. NaN/inf are set to 0 and negative
      values clipped to 0 (counted in ``nonfinite_counts_zeroed``,
      ``negative_counts_clipped``).
    - ``position`` (required): (J, 2) probe centres (y, x) in **metres**.
    - ``mask`` (optional): (N, N), True = valid pixel.
    - ``probe`` (optional): (N, N) or (K, N, N) complex probe guess, centre at pixel
      ``N//2`` (real space: never shifted).
    - 0-d arrays: attributes. ``radiation`` (``"xray"`` or ``"electron"``),
      ``energy_eV`` and ``pixel_size_m`` are required, here or as keyword arguments
      (keywords win); ``wavelength_m`` is computed from the energy unless given; any
      other 0-d array (``detector_distance_m``, ``probe_semiangle_rad`` ...) becomes an
      attribute as well.

    A ``.npy`` file holds the intensity only; give ``position`` (and the others) as
    keyword arrays. Keyword arrays replace the file's. ``.bz2``-compressed files are
    read too. Nothing is ever unpickled (``allow_pickle=False``).

    Parameters
    ----------
    path : str or path-like
    fft_order : bool
        The detector arrays are in FFT order: fftshift them.
    position, mask, probe : array, optional
        Supply or replace the file's arrays.
    **attrs
        Dataset attributes (``radiation``, ``energy_eV``, ``pixel_size_m``, and any
        others such as ``detector_distance_m``).

    Returns
    -------
    xarray.Dataset
        Validated against the format.

    Raises
    ------
    DatasetError
        Naming the missing or malformed key (``intensity``, ``position``,
        ``attrs.energy_eV`` ...) or ``file``.
    """
    arrays = _read_arrays(path)
    for name, value in (("position", position), ("mask", mask), ("probe", probe)):
        if value is not None:
            arrays[name] = np.asarray(value)
    file_attrs = {}
    for name in list(arrays):
        if name not in NPZ_KEYS and np.ndim(arrays[name]) == 0:
            file_attrs[name] = _scalar(arrays.pop(name))
    unknown = sorted(set(arrays) - set(NPZ_KEYS))
    if unknown:
        raise DatasetError(unknown[0], f"unknown array (shape {np.shape(arrays[unknown[0]])}); expected the keys "
                           f"{', '.join(NPZ_KEYS)} and 0-d arrays for attributes")
    for key in ("intensity", "position"):
        if key not in arrays:
            where = "a .npy file holds only the intensity: pass position=... (metres)" if key == "position" else "store it in the file"
            raise DatasetError(key, f"missing from {os.path.basename(os.fspath(path))}; expected {NPZ_KEYS[key]} ({where})")
    meta = {**file_attrs, **attrs}
    for key in _REQUIRED_ATTRS:
        if meta.get(key) is None:
            raise DatasetError(f"attrs.{key}", f"missing; pass {key}=... or store a 0-d array {key!r} in the file")
    radiation = meta.pop("radiation")
    energy = meta.pop("energy_eV")
    dx = meta.pop("pixel_size_m")
    lam = meta.pop("wavelength_m", None)

    # the repairs of the counts need real numbers; every other check is build_dataset's
    inten, count_attrs = clean_counts(check_intensity(arrays["intensity"]))
    msk = arrays.get("mask")
    if fft_order:
        inten = np.fft.fftshift(inten, axes=(-2, -1))
        if msk is not None and np.ndim(msk) == 2:
            msk = np.fft.fftshift(msk)
    extra = {
        "source_file": os.path.basename(os.fspath(path)),
        "importer": "daskptycho.io.importers.import_npz",
        **count_attrs,
        **meta,
    }
    return build_dataset(inten, arrays["position"], radiation=radiation, energy_eV=energy, wavelength_m=lam,
                         pixel_size_m=dx, mask=msk, probe=arrays.get("probe"), attrs=extra)
