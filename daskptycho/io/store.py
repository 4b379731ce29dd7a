"""The daskptycho dataset format on Zarr (see ``docs/format.md``).

A dataset store holds measured diffraction intensities and scan positions and,
for simulations, the ground truth. :func:`open_dataset` opens it lazily as a
dask-backed :class:`xarray.Dataset` and validates it; :func:`write_dataset` writes
one atomically (to a temporary sibling, then renamed).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
import warnings

import numpy as np
import xarray as xr

from ..errors import DatasetError, OutputExistsError

FORMAT_NAME = "daskptycho-dataset"
RESULT_FORMAT_NAME = "daskptycho-result"
FORMAT_VERSION = 1

REQUIRED_ATTRS = {
    "radiation": "'electron' or 'xray'",
    "energy_eV": "a positive number (beam energy in eV)",
    "wavelength_m": "a positive number (wavelength in metres)",
    "pixel_size_m": "a positive number (real-space pixel size in metres implied by the detector sampling)",
    "format_version": f"the integer {FORMAT_VERSION}",
}

# variable -> (dims, dtype, required)
SCHEMA = {
    "intensity": (("scan", "ky", "kx"), np.float32, True),
    "position": (("scan", "yx"), np.float64, True),
    "mask": (("ky", "kx"), np.bool_, False),
    "probe": (("mode", "py", "px"), np.complex64, False),
    "truth_object": (("slice", "y", "x"), np.complex64, False),
    "truth_probe": (("mode", "py", "px"), np.complex64, False),
}


# --------------------------------------------------------------------------- writing

def _atomic_write(ds: xr.Dataset, path, overwrite: bool, encoding=None):
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists: pass overwrite=True (CLI: --overwrite) to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        ds.to_zarr(tmp, mode="w-", consolidated=False, encoding=encoding or {}, zarr_format=3)
        if os.path.exists(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _scan_chunk(n_scan, pattern_bytes, target_bytes=4 * 2**20):
    return int(max(1, min(n_scan, target_bytes // max(pattern_bytes, 1))))


def write_dataset(ds: xr.Dataset, path, overwrite: bool = False, scan_chunk: int | None = None):
    """Write a dataset store atomically.

    Parameters
    ----------
    ds : xarray.Dataset
        Must pass :func:`validate_dataset` (it is checked first).
    path : str or path-like
        Target directory (a Zarr v3 store).
    overwrite : bool
        Replace an existing store.
    scan_chunk : int, optional
        Patterns per chunk along ``scan`` (default: about 4 MiB per chunk, so a
        worker reading its tile's patterns never holds much more than them).
    """
    validate_dataset(ds, check_values=True)
    ds = ds.copy()
    ds.attrs.setdefault("format", FORMAT_NAME)
    n_scan, ny, nx = ds["intensity"].shape
    chunk = scan_chunk or _scan_chunk(n_scan, ny * nx * 4)
    encoding = {}
    for name, var in ds.variables.items():
        if "scan" in var.dims:
            chunks = tuple(chunk if d == "scan" else var.sizes[d] for d in var.dims)
        else:
            chunks = tuple(var.shape)
        if var.ndim:
            encoding[name] = {"chunks": chunks}
        ds[name].encoding = {}
    ds = ds.chunk({"scan": chunk})  # zarr chunks and dask chunks must line up
    return _atomic_write(ds, path, overwrite, encoding)


def write_result(ds: xr.Dataset, path, overwrite: bool = False):
    """Write a reconstruction result store atomically (see ``docs/format.md``)."""
    ds = ds.copy()
    ds.attrs.setdefault("format", RESULT_FORMAT_NAME)
    for name in ds.variables:
        ds[name].encoding = {}
    return _atomic_write(ds, path, overwrite)


# --------------------------------------------------------------------------- reading

def _open_zarr(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DatasetError("store", f"{path} does not exist: give the path of a daskptycho Zarr store")
    if not os.path.isdir(path) or not (
        os.path.exists(os.path.join(path, "zarr.json")) or os.path.exists(os.path.join(path, ".zgroup"))
    ):
        raise DatasetError("store", f"{path} is not a Zarr store (no zarr.json): write one with daskptycho.write_dataset or import it with 'daskptycho import'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return xr.open_zarr(path, consolidated=False, chunks={}, mask_and_scale=False)
    except DatasetError:
        raise
    except ValueError as e:
        import re

        m = re.search(r"conflicting sizes for dimension '(\w+)'", str(e))
        if m:
            dim = m.group(1)
            field, n, ref = _odd_one_out(path, dim)
            raise DatasetError(field, f"has {n} entries along '{dim}' but intensity has {ref}; expected one entry per {dim} point in every variable") from None
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError("metadata", f"the store's Zarr metadata cannot be read (ValueError: {msg}); re-create the store") from None
    except Exception as e:  # garbage or inconsistent metadata
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError("metadata", f"the store's Zarr metadata cannot be read ({type(e).__name__}: {msg}); re-create the store") from None


def _odd_one_out(path, dim):
    """The variable whose length along ``dim`` differs from ``intensity``'s (from the
    Zarr metadata alone), with its length and the reference length."""
    import zarr

    group = zarr.open_group(os.fspath(path), mode="r")
    sizes = {}
    for name, arr in group.arrays():
        dims = list(getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS", []))
        if dim in dims:
            sizes[name] = arr.shape[dims.index(dim)]
    ref = sizes.get("intensity", max(sizes.values(), key=list(sizes.values()).count) if sizes else 0)
    odd = sorted(n for n, v in sizes.items() if v != ref)
    return (odd[0] if odd else dim), (sizes[odd[0]] if odd else "?"), ref


def open_dataset(path, check_values: bool = True) -> xr.Dataset:
    """Open a daskptycho dataset store lazily and validate it.

    Parameters
    ----------
    path : str or path-like
        The Zarr store.
    check_values : bool
        Also scan the intensities for NaN, inf and negative values (a streaming,
        chunk-by-chunk dask reduction; memory stays bounded by one chunk).

    Returns
    -------
    xarray.Dataset
        Dask-backed; nothing but metadata and ``position`` is read eagerly.

    Raises
    ------
    DatasetError
        Naming the field at fault and what is expected.
    """
    ds = _open_zarr(path)
    ds.attrs["source"] = os.path.abspath(os.fspath(path))
    validate_dataset(ds, check_values=check_values)
    return ds


def open_result(path) -> xr.Dataset:
    """Open a reconstruction result store (lazily)."""
    ds = _open_zarr(path)
    if ds.attrs.get("format") != RESULT_FORMAT_NAME or "object" not in ds:
        raise DatasetError("format", f"{path} is not a daskptycho result store (attribute format={RESULT_FORMAT_NAME!r} and variable 'object' expected)")
    return ds


def _positive_number(ds, name, expect):
    v = ds.attrs.get(name)
    try:
        ok = v is not None and not isinstance(v, (bool, str)) and math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DatasetError(f"attrs.{name}", f"got {v!r}; expected {expect}")


def validate_dataset(ds: xr.Dataset, check_values: bool = True) -> None:
    """Check a dataset against the format; raise one :class:`DatasetError` on the first problem."""
    for name, (dims, dtype, required) in SCHEMA.items():
        if name not in ds.variables:
            if required:
                raise DatasetError(name, f"variable missing; expected {name}{dims} {np.dtype(dtype).name}")
            continue
        var = ds[name]
        if tuple(var.dims) != dims:
            raise DatasetError(name, f"has dims {tuple(var.dims)}; expected {dims}")
        if var.dtype != np.dtype(dtype):
            raise DatasetError(name, f"has dtype {var.dtype}; expected {np.dtype(dtype).name}")
        if var.size == 0:
            raise DatasetError(name, f"is empty (shape {var.shape}); expected at least one element on every axis")
        if "units" not in var.attrs and name != "mask":
            raise DatasetError(f"{name}.attrs.units", "missing; every variable carries a 'units' attribute")

    for name, expect in REQUIRED_ATTRS.items():
        if name not in ds.attrs:
            raise DatasetError(f"attrs.{name}", f"missing; expected {expect}")
    if ds.attrs["radiation"] not in ("electron", "xray"):
        raise DatasetError("attrs.radiation", f"got {ds.attrs['radiation']!r}; expected 'electron' or 'xray'")
    for name in ("energy_eV", "wavelength_m", "pixel_size_m"):
        _positive_number(ds, name, REQUIRED_ATTRS[name])
    fv = ds.attrs["format_version"]
    if isinstance(fv, bool) or not isinstance(fv, (int, np.integer)) or fv > FORMAT_VERSION or fv < 1:
        raise DatasetError("attrs.format_version", f"got {fv!r}; this daskptycho reads format version {FORMAT_VERSION}")

    if "yx" not in ds.coords or [str(v) for v in ds["yx"].values] != ["y", "x"]:
        raise DatasetError("yx", "coordinate missing or wrong; expected yx = ['y', 'x'] (y is the row axis)")
    n_scan = ds.sizes["scan"]
    if "scan" in ds.coords and ds["scan"].size != n_scan:
        raise DatasetError("scan", "coordinate length does not match the intensity's scan axis")
    ny, nx = ds.sizes["ky"], ds.sizes["kx"]
    for name in ("probe", "truth_probe"):
        if name in ds and tuple(ds[name].shape[-2:]) != (ny, nx):
            raise DatasetError(name, f"window {ds[name].shape[-2]}x{ds[name].shape[-1]} differs from the detector {ny}x{nx}; expected the same shape")
    if "mask" in ds and not bool(np.asarray(ds["mask"].values).any()):
        raise DatasetError("mask", "marks no detector pixel as valid; expected True for the pixels to use")

    pos = np.asarray(ds["position"].values)
    if pos.shape != (n_scan, 2):
        raise DatasetError("position", f"shape {pos.shape}; expected ({n_scan}, 2), one (y, x) per scan point")
    if not np.isfinite(pos).all():
        raise DatasetError("position", "contains NaN or inf; expected finite positions in metres")

    if check_values:
        inten = ds["intensity"].data
        import dask.array as da

        try:
            if hasattr(inten, "dask"):
                bad_finite, vmin = da.compute(~da.isfinite(inten).all(), da.nanmin(inten))
            else:
                bad_finite, vmin = not np.isfinite(inten).all(), np.nanmin(inten)
        except Exception as e:  # truncated or deleted chunks surface here
            raise DatasetError("intensity", f"data cannot be read ({type(e).__name__}); a chunk is missing or corrupt: re-create or re-import the store") from None
        if bad_finite:
            raise DatasetError("intensity", "contains NaN or inf; expected finite measured intensities")
        if vmin < 0:
            raise DatasetError("intensity", f"contains negative values (min {float(vmin):.4g}); expected intensities >= 0 (subtract the background and clip)")


# --------------------------------------------------------------------------- construction

def build_dataset(intensity, position_m, *, radiation, energy_eV, wavelength_m, pixel_size_m,
                  mask=None, probe=None, truth_object=None, truth_probe=None, truth_grid=None,
                  slice_thickness_m=None, attrs=None) -> xr.Dataset:
    """Assemble a dataset in the daskptycho format (used by the simulator and importers).

    Parameters
    ----------
    intensity : array (J, N, N) float32, centred (zero frequency at the centre)
    position_m : array (J, 2) float64, probe centres (y, x) in metres
    mask : bool array (N, N), optional
    probe : complex array (K, N, N), optional, a probe guess
    truth_object : complex array (S, H, W), optional, with ``truth_grid`` (an ObjectGrid)
    truth_probe : complex array (K, N, N), optional
    attrs : dict, extra attributes (probe-forming parameters, geometry ...)
    """
    intensity = np.asarray(intensity, dtype=np.float32)
    j, ny, nx = intensity.shape
    k = (np.arange(ny) - ny // 2) / (ny * pixel_size_m), (np.arange(nx) - nx // 2) / (nx * pixel_size_m)
    # variable-length strings: Zarr v3 has a stable encoding for them (not for fixed-width)
    coords = {"scan": np.arange(j), "yx": np.array(["y", "x"], dtype=object), "ky": k[0], "kx": k[1]}
    data = {
        "intensity": (("scan", "ky", "kx"), intensity, {"units": "counts", "long_name": "measured diffraction intensity, zero frequency at the centre"}),
        "position": (("scan", "yx"), np.asarray(position_m, dtype=np.float64), {"units": "m", "long_name": "probe centre in the sample plane"}),
    }
    if mask is not None:
        data["mask"] = (("ky", "kx"), np.asarray(mask, dtype=bool), {"long_name": "valid detector pixels"})
    if probe is not None:
        data["probe"] = (("mode", "py", "px"), np.asarray(probe, dtype=np.complex64).reshape((-1, ny, nx)), {"units": "sqrt(counts)", "long_name": "probe guess, centre at pixel N//2"})
    if truth_probe is not None:
        data["truth_probe"] = (("mode", "py", "px"), np.asarray(truth_probe, dtype=np.complex64).reshape((-1, ny, nx)), {"units": "sqrt(counts)", "long_name": "true probe"})
    if truth_object is not None:
        data["truth_object"] = (("slice", "y", "x"), np.asarray(truth_object, dtype=np.complex64), {"units": "1", "long_name": "true transmission function per slice"})
        coords["y"] = ("y", truth_grid.y, {"units": "m", "long_name": "pixel centre"})
        coords["x"] = ("x", truth_grid.x, {"units": "m", "long_name": "pixel centre"})
        coords["slice"] = np.arange(truth_object.shape[0])
    ds = xr.Dataset(data, coords=coords)
    ds["ky"].attrs["units"] = ds["kx"].attrs["units"] = "1/m"
    ds.attrs.update({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "radiation": radiation,
        "energy_eV": float(energy_eV),
        "wavelength_m": float(wavelength_m),
        "pixel_size_m": float(pixel_size_m),
    })
    if slice_thickness_m is not None:
        ds.attrs["slice_thickness_m"] = float(slice_thickness_m)
    ds.attrs.update(attrs or {})
    return ds
