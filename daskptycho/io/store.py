"""The daskptycho dataset format on Zarr (see ``docs/format.md``).

A dataset store holds measured diffraction intensities and scan positions and,
for simulations, the ground truth. :func:`open_dataset` opens it lazily as a
dask-backed :class:`xarray.Dataset` and validates it; :func:`write_dataset` writes
one atomically (to a temporary sibling, then renamed).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
import warnings

import numpy as np
import xarray as xr

from ..errors import DatasetError, OutputExistsError
from ..radiation import wavelength
from .atomic import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2, temporary_sibling
from .checkpoint import CHECKPOINT_FORMAT_NAME, GROUP, Checkpoint

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

# temporary siblings of an atomic write (this module's ``.tmp-``, the checkpoint
# writer's ``.result-``), and the ``.old`` store a swap is about to delete
_TMP_RE = re.compile(r"^\..+\.(tmp|result)-[0-9a-f]{8}(\.old)?$")


def atomic_write_store(ds: xr.Dataset, path, overwrite: bool, encoding=None):
    """Write ``ds`` to a temporary sibling of ``path`` and move it into place.

    Readers never see a partial store at ``path``: a killed write leaves only the
    temporary sibling (``.NAME.tmp-XXXXXXXX``, refused by :func:`open_dataset` and
    :func:`open_result`). With ``overwrite`` the old store is swapped out in one
    ``renameat2(RENAME_EXCHANGE)`` where Linux has it, so ``path`` always holds
    either the old complete store or the new one.
    """
    path, tmp = temporary_sibling(path, overwrite)
    try:
        # every chunk is written, even one equal to the fill value: open_dataset
        # takes a missing chunk file for damage (Zarr would read it as fill values)
        ds.to_zarr(tmp, mode="w-", consolidated=False, encoding=encoding or {}, zarr_format=3, write_empty_chunks=True)
        if not os.path.lexists(path):
            try:
                if not renameat2(tmp, path, RENAME_NOREPLACE):
                    os.rename(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"{path} appeared while it was being written: pass overwrite=True to replace it") from None
        elif not overwrite:
            raise OutputExistsError(f"{path} appeared while it was being written: pass overwrite=True to replace it")
        elif os.path.isdir(path) and not os.path.islink(path) and renameat2(tmp, path, RENAME_EXCHANGE):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old store
        else:
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def default_scan_chunk(n_scan, pattern_bytes, target_bytes=4 * 2**20):
    """Patterns per chunk along ``scan``: about ``target_bytes`` (4 MiB) per chunk, at
    least 1 and at most ``n_scan``; ``pattern_bytes`` is the size of one stored pattern."""
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
    chunk = scan_chunk or default_scan_chunk(n_scan, ny * nx * 4)
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
    return atomic_write_store(ds, path, overwrite, encoding)


def write_result(ds: xr.Dataset, path, overwrite: bool = False):
    """Write a reconstruction result store atomically (see ``docs/format.md``)."""
    ds = ds.copy()
    ds.attrs.setdefault("format", RESULT_FORMAT_NAME)
    for name in ds.variables:
        ds[name].encoding = {}
    return atomic_write_store(ds, path, overwrite)


# --------------------------------------------------------------------------- reading

def error_line(e):
    """One line naming an exception (its type and first line)."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _read_meta(path, name):
    """The parsed ``zarr.json`` of the group (``name=""``) or array ``name``; a
    :class:`DatasetError` naming the metadata if it is not a JSON object."""
    where = os.path.join(name, "zarr.json") if name else "zarr.json"
    try:
        with open(os.path.join(path, where), "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError("metadata", f"{where} of the store cannot be read ({error_line(e)}); re-create the store") from None
    if not isinstance(meta, dict):
        raise DatasetError("metadata", f"{where} holds a JSON {type(meta).__name__}, not an object; re-create the store")
    return meta


def _is_int_list(v, n=None, minimum=0):
    return (isinstance(v, list) and (n is None or len(v) == n)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in v))


def _check_layout(path):
    """Check the Zarr v3 metadata of every node from its JSON alone, before xarray
    touches the store. Returns ``{array name: metadata}``.

    Catches what xarray and Zarr report obscurely or not at all: unreadable or
    malformed metadata, a file where an array directory belongs, and variables that
    disagree on a dimension's length (the variable at fault is named: the one whose
    dims differ from the format, else the one in the minority).
    """
    root = _read_meta(path, "")
    if root.get("zarr_format") != 3 or root.get("node_type") != "group":
        raise DatasetError("metadata", f"zarr.json has zarr_format={root.get('zarr_format')!r}, node_type={root.get('node_type')!r}; "
                           "expected a Zarr v3 group (re-create the store)")
    if not isinstance(root.get("attributes", {}), dict):
        raise DatasetError("metadata", "zarr.json 'attributes' is not a JSON object; re-create the store")
    arrays = {}
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = entry.name
        if name == "zarr.json" or name.startswith("."):
            continue
        if not entry.is_dir():
            if name in SCHEMA:
                raise DatasetError(name, f"{os.path.join(path, name)} is a file where a Zarr array directory belongs; re-create the store")
            continue
        if not os.path.isfile(os.path.join(path, name, "zarr.json")):
            if os.path.lexists(os.path.join(path, name, "zarr.json")) or name in SCHEMA:
                raise DatasetError(name, f"{name}/ holds no zarr.json file (Zarr array metadata); re-create the store")
            continue  # not a Zarr node: xarray ignores it too
        meta = _read_meta(path, name)
        node = meta.get("node_type")
        if meta.get("zarr_format") != 3 or node not in ("array", "group") or (node == "group" and name in SCHEMA):
            raise DatasetError("metadata", f"{name}/zarr.json has zarr_format={meta.get('zarr_format')!r}, node_type={node!r}; "
                               f"expected a Zarr v3 {'array' if name in SCHEMA else 'node'} (re-create the store)")
        if node == "group":
            extra = set(meta) - {"attributes", "zarr_format", "node_type", "consolidated_metadata"}
            if extra:
                raise DatasetError("metadata", f"{name}/zarr.json is a group's metadata with array keys {sorted(extra)}; re-create the store")
            continue
        shape = meta.get("shape")
        dims = meta.get("dimension_names")
        grid = meta.get("chunk_grid")
        chunk_shape = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) and isinstance(grid.get("configuration"), dict) else None
        problem = None
        if not _is_int_list(shape):
            problem = f"shape {shape!r} is not a list of non-negative integers"
        elif dims is not None and not (isinstance(dims, list) and len(dims) == len(shape) and all(isinstance(d, str) for d in dims)):
            problem = f"dimension_names {dims!r} do not name each of the {len(shape)} axes"
        elif not isinstance(meta.get("data_type"), (str, dict)):
            problem = f"data_type {meta.get('data_type')!r} is not a Zarr data type"
        elif not (isinstance(grid, dict) and grid.get("name") == "regular" and _is_int_list(chunk_shape, len(shape), 1)):
            problem = f"chunk_grid {grid!r} is not a regular grid with one positive chunk length per axis"
        if problem:
            raise DatasetError("metadata", f"{name}/zarr.json: {problem}; re-create the store")
        if _pickled(meta):
            raise DatasetError(name, "holds Python objects (a pickle codec); daskptycho never unpickles store data: store numeric arrays")
        arrays[name] = meta
    _check_dimension_sizes(arrays)
    return arrays


def _pickled(meta):
    """Does this array's metadata ask for Python objects (object dtype or a pickle codec)?"""
    text = json.dumps([meta.get("dtype"), meta.get("data_type"), meta.get("codecs"), meta.get("filters"), meta.get("compressor")])
    return "pickle" in text.lower() or meta.get("dtype") in ("|O", "O", "object")


def _check_layout_v2(path):
    """A Zarr v2 store: refuse arrays of Python objects before Zarr decodes anything
    (v2 allows pickled object arrays; unpickling runs code from the file)."""
    with os.scandir(path) as it:
        names = sorted(e.name for e in it if e.is_dir() and os.path.exists(os.path.join(e.path, ".zarray")))
    for name in names:
        try:
            with open(os.path.join(path, name, ".zarray"), "rb") as f:
                meta = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise DatasetError("metadata", f"{name}/.zarray of the store cannot be read ({error_line(e)}); re-create the store") from None
        if not isinstance(meta, dict):
            raise DatasetError("metadata", f"{name}/.zarray is not a JSON object; re-create the store")
        if _pickled(meta):
            raise DatasetError(name, "holds Python objects (object dtype or a pickle codec); daskptycho never unpickles store data: "
                               "store numeric arrays")
    return {}


def _check_dimension_sizes(arrays):
    """Every variable must give each dimension the same length (xarray refuses to
    open the store otherwise, without saying which variable is wrong)."""
    for name, (dims, _dtype, _req) in SCHEMA.items():
        meta = arrays.get(name)
        if meta is not None and meta.get("dimension_names") is not None and tuple(meta["dimension_names"]) != dims:
            sizes = {}
            for m in arrays.values():
                for d, n in zip(m.get("dimension_names") or (), m["shape"]):
                    sizes.setdefault(d, set()).add(n)
            if any(len(v) > 1 for v in sizes.values()):
                raise DatasetError(name, f"has dims {tuple(meta['dimension_names'])}; expected {dims}")
    lengths = {}
    for name, meta in arrays.items():
        for d, n in zip(meta.get("dimension_names") or (), meta["shape"]):
            lengths.setdefault(d, {})[name] = n
    for dim, per in lengths.items():
        values = list(per.values())
        if len(set(values)) < 2:
            continue
        votes = {v: values.count(v) for v in set(values)}
        # the majority length is right; on a tie, the intensity's, else the longer
        # (damage truncates more often than it extends)
        ref = max(votes, key=lambda v: (votes[v], per.get("intensity") == v, v))
        odd = sorted(n for n, v in per.items() if v != ref)
        culprit = next((n for n in odd if n in SCHEMA), odd[0])
        raise DatasetError(culprit, f"has {per[culprit]} entries along '{dim}' but {'intensity' if per.get('intensity') == ref else 'the other variables'} "
                           f"{'has' if per.get('intensity') == ref else 'have'} {ref}; expected one entry per {dim} point in every variable")


def chunk_key(meta, coords):
    """The file name (relative to the array directory) of the chunk at ``coords``."""
    enc = meta.get("chunk_key_encoding") or {"name": "default"}
    name = enc.get("name", "default") if isinstance(enc, dict) else "default"
    sep = (enc.get("configuration") or {}).get("separator", "/" if name == "default" else ".") if isinstance(enc, dict) else "/"
    if name == "v2":
        return sep.join(map(str, coords)) if coords else "0"
    return sep.join(("c", *map(str, coords)))


def missing_chunk(path, name, meta):
    """The key of the first chunk of array ``name`` that has no file, or None.

    Zarr reads a missing chunk as the fill value without a word; the stores
    daskptycho writes hold every chunk, so a missing one is damage. A listing of the
    array's directory, no data read.
    """
    shape, chunk_shape = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    if 0 in shape:
        return None
    base = os.path.join(path, name)
    present = set()
    for root, _dirs, files in os.walk(base):
        rel = os.path.relpath(root, base)
        present.update(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/") for f in files)
    for coords in np.ndindex(*(math.ceil(n / c) for n, c in zip(shape, chunk_shape))):
        key = chunk_key(meta, coords)
        if key not in present:
            return key
    return None


def _diagnose_read(path, arrays):
    """After xarray failed to open the store: the first array that fails on its own,
    as a DatasetError naming it, or None.

    Each array's metadata is opened by xarray alone, in a scratch group holding only
    the root's and that array's ``zarr.json`` (xarray parses every member of a group
    even with ``drop_variables``); then the data of the coordinates, which xarray
    reads eagerly, is decoded."""
    import tempfile

    import zarr

    if not os.path.exists(os.path.join(path, "zarr.json")):
        return None  # a Zarr v2 store: no per-array diagnosis
    names = sorted(arrays, key=lambda n: (n not in SCHEMA, n))
    with tempfile.TemporaryDirectory(prefix="daskptycho-diagnose-") as scratch:
        shutil.copyfile(os.path.join(path, "zarr.json"), os.path.join(scratch, "zarr.json"))
        for name in names:
            os.mkdir(os.path.join(scratch, name))
            shutil.copyfile(os.path.join(path, name, "zarr.json"), os.path.join(scratch, name, "zarr.json"))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    xr.open_zarr(scratch, consolidated=False, chunks={}, mask_and_scale=False).close()
                dims = arrays[name].get("dimension_names") or ()
                if len(dims) == 1 and dims[0] == name:
                    zarr.open_array(os.path.join(path, name), mode="r")[...]
            except Exception as e:  # noqa: BLE001 - whatever fails here is damage to this array's metadata or data
                return DatasetError(name, f"cannot be opened ({error_line(e)}): its metadata or stored data is damaged; re-create or re-import the store")
            finally:
                shutil.rmtree(os.path.join(scratch, name))
    return None


def checkpoint_info(path):
    """What the store at ``path`` holds if it is the checkpoint of an unfinished run.

    A run with ``checkpoint_every`` (``--checkpoint-every`` of the command line) keeps its checkpoints
    in its result store, which is a bare group with attribute
    ``format = "daskptycho-checkpoint"`` until the finished result replaces it (see
    :mod:`daskptycho.io.checkpoint`).

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    dict or None
        None unless ``path`` is such a store; else ``engine``, ``completed`` (iterations
        of the latest complete checkpoint, None before the first), ``iterations`` (the
        run's total) and ``checkpoint_every`` (None where unknown).
    """
    try:
        with open(os.path.join(os.fspath(path), "zarr.json"), "rb") as f:
            root = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    attrs = root.get("attributes") if isinstance(root, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != CHECKPOINT_FORMAT_NAME:
        return None
    try:
        meta = Checkpoint(path).latest()
    except DatasetError:  # a damaged pointer: nothing to resume either
        meta = None
    options = (meta or {}).get("options") or {}
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError:
            options = {}

    def _int(v):
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return {"engine": (meta or {}).get("engine"), "completed": _int((meta or {}).get("completed")),
            "iterations": _int(options.get("iterations")), "checkpoint_every": _int(options.get("checkpoint_every"))}


def _checkpoint_problem(path, ck):
    """Why a checkpoint store cannot be read as a dataset or result, and what to do with it."""
    if ck["completed"] is None:
        return (f"{path} is the store of a run interrupted before its first checkpoint, not a dataset or a result: "
                "nothing can be resumed from it; reconstruct the run's dataset again with overwrite=True to start afresh")
    total = ck["iterations"]
    of = f" of {total}" if total is not None else ""
    more = f" iterations={total}" if total is not None else ""
    return (f"{path} is the checkpoint of an unfinished run (engine {ck['engine']!r}, {ck['completed']}{of} iterations completed), "
            f"not a dataset or a result: to continue the run, reconstruct its dataset with checkpoint={os.fspath(path)!r} "
            f"resume=True{more}; to start afresh, with overwrite=True")


def _refuse_unfinished_stream(path):
    """A growing store whose writer has not finished (``attrs.stream.scan_finished`` false)
    is not a dataset yet: its arrays may hold a chunk beyond the committed frames. Its
    committed frames are read with :func:`daskptycho.io.stream.open_frames`."""
    try:
        with open(os.path.join(path, "zarr.json"), "rb") as f:
            root = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return  # no root metadata or unreadable: the layout checks name the problem
    stream = (root.get("attributes") or {}).get("stream") if isinstance(root, dict) and isinstance(root.get("attributes"), dict) else None
    if isinstance(stream, dict) and stream.get("scan_finished") is not True:
        raise DatasetError("attrs.stream", f"{path} is a growing store whose scan is not finished ({stream.get('frames_complete')} frames committed, "
                           f"last commit {stream.get('last_commit_utc') or 'none yet'}): read the committed frames with "
                           "daskptycho.io.stream.open_frames(path) or wait for the writer to finish; if the writer is gone, "
                           "reopen the store with daskptycho.open_writer and its resume option, and call finish()")


def open_zarr(path, required=()):
    """Open a store lazily after checking its layout; ``required``: arrays whose every
    chunk file must exist."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise DatasetError("store", f"{path} does not exist: give the path of a daskptycho Zarr store")
    if _TMP_RE.match(os.path.basename(os.path.normpath(path))):
        raise DatasetError("store", f"{path} is the temporary store of an interrupted write (a complete store is renamed into place); "
                           "delete it and run the command again")
    ck = checkpoint_info(path)
    if ck is not None:
        raise DatasetError("store", _checkpoint_problem(path, ck))
    if not os.path.isdir(path) or not (
        os.path.exists(os.path.join(path, "zarr.json")) or os.path.exists(os.path.join(path, ".zgroup"))
    ):
        raise DatasetError("store", f"{path} is not a Zarr store (no zarr.json): write one with daskptycho.write_dataset or import it with 'daskptycho import'")
    _refuse_unfinished_stream(path)
    arrays = _check_layout(path) if os.path.exists(os.path.join(path, "zarr.json")) else _check_layout_v2(path)
    for name in required:
        if name in arrays:
            key = missing_chunk(path, name, arrays[name])
            if key is not None:
                raise DatasetError(name, f"chunk file {name}/{key} is missing (Zarr would read it as fill values); re-create or re-import the store")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return xr.open_zarr(path, consolidated=False, chunks={}, mask_and_scale=False)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - the reading boundary: whatever zarr/xarray raise on a damaged store becomes one DatasetError
        err = _diagnose_read(path, arrays)
        if err is not None:
            raise err from None
        raise DatasetError("metadata", f"the store's Zarr metadata cannot be read ({error_line(e)}); re-create the store") from None


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
    ds = open_zarr(path, required=tuple(SCHEMA))
    ds.attrs["source"] = os.path.abspath(os.fspath(path))
    validate_dataset(ds, check_values=check_values)
    return ds


def open_result(path) -> xr.Dataset:
    """Open a reconstruction result store (lazily); refuses a temporary store left by
    an interrupted write, and one with a missing chunk."""
    ds = open_zarr(path, required=("object", "probe", "cost"))
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

    if "yx" not in ds.coords or [str(v) for v in _values(ds, "yx")] != ["y", "x"]:
        raise DatasetError("yx", "coordinate missing or wrong; expected yx = ['y', 'x'] (y is the row axis)")
    n_scan = ds.sizes["scan"]
    if "scan" in ds.coords:
        scan = _values(ds, "scan")
        if scan.size != n_scan:
            raise DatasetError("scan", "coordinate length does not match the intensity's scan axis")
        if scan.dtype.kind not in "iu" or np.unique(scan).size != scan.size:
            raise DatasetError("scan", f"coordinate has dtype {scan.dtype} with {scan.size - np.unique(scan).size} repeated values; "
                               "expected distinct integers, one per pattern (0 .. J-1)")
    for name in ("ky", "kx", "y", "x"):
        if name in ds.coords:
            v = _values(ds, name)
            if v.dtype.kind not in "fiu" or not np.isfinite(v).all():
                raise DatasetError(name, f"coordinate has dtype {v.dtype} or non-finite values; expected finite numbers ({ds[name].attrs.get('units', '')})")
    ny, nx = ds.sizes["ky"], ds.sizes["kx"]
    for name in ("probe", "truth_probe"):
        if name in ds and tuple(ds[name].shape[-2:]) != (ny, nx):
            raise DatasetError(name, f"window {ds[name].shape[-2]}x{ds[name].shape[-1]} differs from the detector {ny}x{nx}; expected the same shape")
    if "mask" in ds and not bool(_values(ds, "mask").any()):
        raise DatasetError("mask", "marks no detector pixel as valid; expected True for the pixels to use")

    pos = _values(ds, "position")
    if pos.shape != (n_scan, 2):
        raise DatasetError("position", f"shape {pos.shape}; expected ({n_scan}, 2), one (y, x) per scan point")
    if not np.isfinite(pos).all():
        raise DatasetError("position", "contains NaN or inf; expected finite positions in metres")
    _check_field(ds, pos, (ny, nx))

    if check_values:
        inten = ds["intensity"].data
        import dask.array as da

        try:
            if hasattr(inten, "dask"):
                bad_finite, vmin = da.compute(~da.isfinite(inten).all(), da.nanmin(inten))
            else:
                bad_finite, vmin = not np.isfinite(inten).all(), np.nanmin(inten)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt chunks surface here: the reading boundary
            raise DatasetError("intensity", f"data cannot be read ({error_line(e)}); a chunk is missing or corrupt: re-create or re-import the store") from None
        if bad_finite:
            raise DatasetError("intensity", "contains NaN or inf; expected finite measured intensities")
        if vmin < 0:
            raise DatasetError("intensity", f"contains negative values (min {float(vmin):.4g}); expected intensities >= 0 (subtract the background and clip)")
        for name in ("probe", "truth_probe", "truth_object"):
            if name in ds and not np.isfinite(_values(ds, name)).all():
                raise DatasetError(name, "contains NaN or inf; expected finite complex values")


#: most object pixels per axis the positions may span (beyond it a single slice
#: needs more than 128 GiB): a position this far out is a unit error or an outlier
MAX_FIELD_PX = 2**17


def _check_field(ds, pos, window):
    """Positions must span a field an object grid can hold, and lie on the truth's grid."""
    dx = float(ds.attrs["pixel_size_m"])
    span = (pos.max(axis=0) - pos.min(axis=0)) / dx + np.asarray(window)
    if (span > MAX_FIELD_PX).any():
        axis = int(np.argmax(span))
        far = int(np.argmax(np.abs(pos[:, axis] - np.median(pos[:, axis]))))
        raise DatasetError("position", f"the positions span {span[0]:.4g} x {span[1]:.4g} pixels of {dx:.4g} m, more than {MAX_FIELD_PX} per axis "
                           f"(the farthest from the median is scan point {far} at {pos[far, axis]:.4g} m along {'yx'[axis]}); "
                           "expected positions in metres in the sample plane")
    if "truth_object" in ds and "y" in ds.coords and "x" in ds.coords:
        for axis, name in enumerate(("y", "x")):
            c = _values(ds, name)
            lo, hi = float(c.min()) - dx, float(c.max()) + dx
            out = np.flatnonzero((pos[:, axis] < lo) | (pos[:, axis] > hi))
            if out.size:
                raise DatasetError("position", f"scan point {int(out[0])} at {name} = {pos[out[0], axis]:.4g} m lies outside the truth object's field "
                                   f"[{lo + dx:.4g}, {hi - dx:.4g}] m ({out.size} such points); expected positions on the object")


def _values(ds, name):
    """The values of ``ds[name]`` as a NumPy array; stored bytes that cannot be decoded
    become a DatasetError naming ``name`` (the reading boundary)."""
    try:
        data = ds[name].data
        # small variables: read in this thread (no scheduler round trip, and never
        # shipped to a distributed client that happens to be the default)
        return np.asarray(data.compute(scheduler="synchronous") if hasattr(data, "dask") else data)
    except Exception as e:  # noqa: BLE001 - any decoding failure of stored bytes is damage to the store
        raise DatasetError(name, f"stored data cannot be read ({error_line(e)}); a chunk is missing or corrupt: re-create or re-import the store") from None


# --------------------------------------------------------------------------- construction

def _positive(name, v, field=None):
    """``float(v)``, or a DatasetError naming ``field`` unless ``v`` is a finite positive number."""
    try:
        ok = not isinstance(v, (bool, str)) and math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DatasetError(field or name, f"got {v!r}; expected a positive number")
    return float(v)


def check_intensity(intensity):
    """The patterns as an array: (J, N, M), real numbers; else a DatasetError naming ``intensity``."""
    inten = np.asarray(intensity)
    if inten.ndim != 3 or 0 in inten.shape:
        raise DatasetError("intensity", f"has shape {inten.shape}; expected (J, N, N) patterns")
    if not np.issubdtype(inten.dtype, np.number) or np.iscomplexobj(inten):
        raise DatasetError("intensity", f"has dtype {inten.dtype}; expected real counts")
    return inten


def check_position(position, n_scan):
    """(J, 2) float64 probe centres in metres; a DatasetError naming ``position`` otherwise."""
    pos = np.asarray(position)
    if pos.shape != (n_scan, 2):
        raise DatasetError("position", f"has shape {pos.shape}; expected ({n_scan}, 2): one (y, x) in metres per pattern")
    if not np.issubdtype(pos.dtype, np.number) or np.iscomplexobj(pos):
        raise DatasetError("position", f"has dtype {pos.dtype}; expected real numbers (metres)")
    pos = pos.astype(np.float64)
    if not np.isfinite(pos).all():
        raise DatasetError("position", "contains NaN or inf; expected finite positions in metres")
    if np.abs(pos).max() > 0.1:
        raise DatasetError("position", f"values up to {np.abs(pos).max():.4g}; expected metres (pixels? multiply by pixel_size_m)")
    return pos


def check_mask(mask, window):
    """An (N, M) bool mask of valid pixels; a DatasetError naming ``mask`` otherwise."""
    msk = np.asarray(mask)
    if msk.shape != tuple(window):
        raise DatasetError("mask", f"has shape {msk.shape}; expected {tuple(window)} like the patterns")
    return msk.astype(bool)


def check_probe(probe, window):
    """A (K, N, M) complex64 probe guess from (N, M) or (K, N, M); a DatasetError naming ``probe`` otherwise."""
    ny, nx = window
    prb = np.asarray(probe)
    if prb.ndim not in (2, 3) or prb.shape[-2:] != (ny, nx):
        raise DatasetError("probe", f"has shape {prb.shape}; expected ({ny}, {nx}) or (K, {ny}, {nx})")
    if not np.issubdtype(prb.dtype, np.number):
        raise DatasetError("probe", f"has dtype {prb.dtype}; expected complex numbers")
    if not np.isfinite(prb).all():
        raise DatasetError("probe", "contains NaN or inf; expected a finite probe")
    return prb.astype(np.complex64).reshape((-1, ny, nx))


def energy_from_wavelength(radiation, wavelength_m):
    """The energy in eV of ``radiation`` (``"xray"``: photons, ``"electron"``: kinetic,
    relativistic) whose wavelength is ``wavelength_m`` metres; the inverse of
    :func:`daskptycho.physics.wavelength`."""
    from scipy import constants as C

    if radiation == "xray":
        return C.h * C.c / (wavelength_m * C.e)
    mc2 = C.m_e * C.c**2
    pc = C.h * C.c / wavelength_m
    return (math.sqrt(pc**2 + mc2**2) - mc2) / C.e


def build_dataset(intensity, position_m, *, pixel_size_m, radiation, energy_eV=None, wavelength_m=None,
                  mask=None, probe=None, truth_object=None, truth_probe=None, truth_grid=None,
                  slice_thickness_m=None, attrs=None, check_values=True) -> xr.Dataset:
    """A dataset in the daskptycho format from arrays, checked, with its attributes stamped.

    The builder behind the simulator and the importers, for anyone with their own
    arrays: it sets the variables' dims, dtypes and units, the coordinates and the
    attributes ``format`` and ``format_version``, then checks the result with
    :func:`validate_dataset`. Write it with :func:`write_dataset`; reconstruct it
    directly or after writing. See ``docs/format.md``.

    Parameters
    ----------
    intensity : array_like (J, N, M)
        Measured counts (any real dtype; stored as float32), zero spatial frequency
        at pixel ``(N//2, M//2)`` (``numpy.fft.fftshift`` patterns in FFT order first),
        >= 0 and finite.
    position_m : array_like (J, 2)
        Probe centres ``(y, x)`` in the sample plane, metres, in acquisition order.
    pixel_size_m : float
        Real-space pixel size in metres that the detector sampling implies:
        ``wavelength * distance / (N * detector pixel)``.
    radiation : {"xray", "electron"}
    energy_eV, wavelength_m : float
        Photon energy or electron kinetic energy (eV), and/or the wavelength (m);
        give either and the other follows (relativistic for electrons).
    mask : array_like (N, M) of bool, optional
        True for the detector pixels to use, in the same (centred) order as ``intensity``.
    probe : array_like (N, M) or (K, N, M), complex, optional
        A probe guess in sqrt(counts), centre at pixel ``(N//2, M//2)`` (real space).
        Without one the store needs the attributes ``probe_semiangle_rad`` and
        ``probe_defocus_m`` (in ``attrs``) to form one.
    truth_object : array (S, H, W) complex, optional
        A known object (simulations), with ``truth_grid`` (an
        :class:`~daskptycho.geometry.ObjectGrid`) giving its pixel centres.
    truth_probe : array (K, N, M) complex, optional
    slice_thickness_m : float, optional
        Slice thickness in metres (multislice samples).
    attrs : dict, optional
        More attributes: ``probe_semiangle_rad``, ``probe_defocus_m``, ``probe_cs_m``,
        ``detector_distance_m`` ... (``docs/format.md``).
    check_values : bool
        Also scan the intensities for NaN, inf and negative values.

    Returns
    -------
    xarray.Dataset
        In memory, valid for :func:`write_dataset` and :func:`daskptycho.reconstruct`.

    Raises
    ------
    DatasetError
        Naming the argument at fault (``intensity``, ``position``, ``mask``, ``probe``,
        ``attrs.radiation``, ``attrs.energy_eV``, ``attrs.pixel_size_m`` ...) and what is expected.
    """
    if radiation not in ("electron", "xray"):
        raise DatasetError("attrs.radiation", f"got {radiation!r}; expected 'electron' or 'xray'")
    if energy_eV is None and wavelength_m is None:
        raise DatasetError("attrs.energy_eV", "missing; pass energy_eV=... (eV) or wavelength_m=... (metres)")
    pixel_size_m = _positive("pixel_size_m", pixel_size_m, "attrs.pixel_size_m")
    if energy_eV is not None:
        energy_eV = _positive("energy_eV", energy_eV, "attrs.energy_eV")
    if wavelength_m is not None:
        wavelength_m = _positive("wavelength_m", wavelength_m, "attrs.wavelength_m")
    if wavelength_m is None:
        wavelength_m = float(wavelength(radiation, energy_eV))
    if energy_eV is None:
        energy_eV = float(energy_from_wavelength(radiation, wavelength_m))
    intensity = check_intensity(intensity).astype(np.float32, copy=False)
    j, ny, nx = intensity.shape
    position_m = check_position(position_m, j)
    k = (np.arange(ny) - ny // 2) / (ny * pixel_size_m), (np.arange(nx) - nx // 2) / (nx * pixel_size_m)
    # variable-length strings: Zarr v3 has a stable encoding for them (not for fixed-width)
    coords = {"scan": np.arange(j), "yx": np.array(["y", "x"], dtype=object), "ky": k[0], "kx": k[1]}
    data = {
        "intensity": (("scan", "ky", "kx"), intensity, {"units": "counts", "long_name": "measured diffraction intensity, zero frequency at the centre"}),
        "position": (("scan", "yx"), position_m, {"units": "m", "long_name": "probe centre in the sample plane"}),
    }
    if mask is not None:
        data["mask"] = (("ky", "kx"), check_mask(mask, (ny, nx)), {"long_name": "valid detector pixels"})
    if probe is not None:
        data["probe"] = (("mode", "py", "px"), check_probe(probe, (ny, nx)), {"units": "sqrt(counts)", "long_name": "probe guess, centre at pixel N//2"})
    if truth_probe is not None:
        data["truth_probe"] = (("mode", "py", "px"), np.asarray(truth_probe, dtype=np.complex64).reshape((-1, ny, nx)), {"units": "sqrt(counts)", "long_name": "true probe"})
    if truth_object is not None:
        if truth_grid is None:
            raise DatasetError("truth_object", "given without truth_grid; pass the ObjectGrid whose pixel centres it is sampled on")
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
        ds.attrs["slice_thickness_m"] = _positive("slice_thickness_m", slice_thickness_m, "attrs.slice_thickness_m")
    ds.attrs.update(attrs or {})
    validate_dataset(ds, check_values=check_values)
    return ds


def write_result_keeping_checkpoint(ds, path):
    """Write the final result ``ds`` into ``path`` atomically, keeping its checkpoint.

    The result is written to a temporary sibling, the checkpoint directory is
    hard-linked (copied where links are impossible) into it, and the sibling
    replaces ``path``; a run killed before the final rename leaves ``path`` as it was.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.result-{uuid.uuid4().hex[:8]}")
    try:
        write_result(ds, tmp)
        src = os.path.join(path, GROUP)
        if os.path.exists(os.path.join(src, "zarr.json")):
            shutil.copytree(src, os.path.join(tmp, GROUP), copy_function=_link_or_copy)
        if os.path.isdir(path) and renameat2(tmp, path, RENAME_EXCHANGE):
            shutil.rmtree(tmp, ignore_errors=True)  # one swap: path is never missing; tmp now holds the old store
        elif os.path.exists(path):
            old = f"{tmp}.old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
