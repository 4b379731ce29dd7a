"""TIFF export of a result: phase (and amplitude) images as ImageJ stacks for Fiji.

One page per object slice, float32, with ImageJ metadata (``axes = "ZYX"``, unit
``um``, the pixel size as the resolution, the slice spacing) so Fiji opens the stack
with its scale. Written atomically (temporary name, then :func:`os.replace`).
``tifffile`` is optional (extra ``export``): without it a clear
:class:`~daskptycho.errors.DaskptychoError` says how to install it.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import DaskptychoError
from .atomic import atomic_file

__all__ = ["write_tiff", "amplitude_path"]


def _tifffile():
    try:
        import tifffile
    except ImportError:
        raise DaskptychoError("TIFF export needs the optional package tifffile: pip install tifffile "
                              "(or pip install 'daskptycho[export]')") from None
    return tifffile


def amplitude_path(path):
    """The amplitude stack's file name beside ``path`` (``phase.tif`` -> ``phase_amplitude.tif``)."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}_amplitude{ext}"


def _write_stack(tifffile, path, stack, dx_um, dz_um, overwrite, description):
    metadata = {"axes": "ZYX", "unit": "um", "Info": description}
    if dz_um:
        metadata["spacing"] = dz_um
    with atomic_file(path, overwrite) as tmp:
        # ImageJ reads the resolution as pixels per unit along x and y
        tifffile.imwrite(tmp, stack, imagej=True, resolution=(1.0 / dx_um, 1.0 / dx_um), metadata=metadata)
    return os.fspath(path)


def write_tiff(result, path, *, amplitude: bool = False, overwrite: bool = False):
    """Write a result's phase images as a multi-page ImageJ TIFF stack.

    Parameters
    ----------
    result : xarray.Dataset
        A result (``object`` (slice, y, x) complex64 and attribute ``pixel_size_m``).
    path : str or path-like
        The ``.tif``/``.tiff`` file: phase in radians (``numpy.angle``, wrapped to
        (-pi, pi]), float32, shape (S, Y, X).
    amplitude : bool
        Also write ``|object|`` (float32) to :func:`amplitude_path` of ``path``.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    list of (str, str)
        The files written and what each holds.
    """
    tifffile = _tifffile()
    obj = np.asarray(result["object"].values)
    if obj.ndim == 2:
        obj = obj[None]
    dx_um = float(result.attrs["pixel_size_m"]) * 1e6
    dz = result.attrs.get("slice_thickness_m") or 0.0
    dz_um = float(dz) * 1e6 if obj.shape[0] > 1 else 0.0
    what = f"{obj.shape[0]} slice(s) of {obj.shape[1]} x {obj.shape[2]} px, pixel {dx_um:.4g} um"
    out = []
    phase = np.angle(obj).astype(np.float32)
    _write_stack(tifffile, path, phase, dx_um, dz_um, overwrite, f"daskptycho phase (rad), engine {result.attrs.get('engine')}")
    out.append((os.fspath(path), f"phase (rad), {what}"))
    if amplitude:
        apath = amplitude_path(path)
        _write_stack(tifffile, apath, np.abs(obj).astype(np.float32), dx_um, dz_um, overwrite,
                     f"daskptycho amplitude, engine {result.attrs.get('engine')}")
        out.append((apath, f"amplitude, {what}"))
    return out
