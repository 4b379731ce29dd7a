"""Growing dataset stores: frames appended while the scan is measured (see ``docs/format.md``).

A growing store is an ordinary dataset store (:mod:`daskptycho.io.store`) whose root
attribute ``stream`` says how many frames are committed. :func:`open_writer` creates
one and appends patterns and positions in whole chunks along ``scan``;
:func:`stream_state`, :func:`wait_for_frames` and :func:`open_frames` read it while it
grows and see only committed frames. When the writer finishes, the store is an
ordinary finished store that :func:`daskptycho.open_dataset` opens.

Commit protocol
---------------
Every array along ``scan`` (``intensity``, ``position``, ``scan``) is chunked by
``chunk_frames`` frames. To commit frames ``[F, G)`` the writer

1. resizes each of those arrays to ``G`` frames (their ``zarr.json``),
2. writes the chunk files of frames ``[F, G)`` of every one of them, and fsyncs them
   (``durable=True``),
3. replaces the root ``zarr.json`` with one whose ``stream.frames_complete`` is ``G``
   (written to a hidden temporary file in the store, fsynced, then ``os.replace``).

Step 3 is one rename, atomic on a POSIX file system: a reader reads either the old
root metadata or the new one, never a mixture. A reader reads ``frames_complete``
first and then only frames below it, whose chunk files were complete before the rename
made them count; chunks at or beyond it (one being written, or left by a killed
writer) are never read, and the arrays' shapes (which may already be larger) are
never relied on. Committed chunks are never rewritten. ``G`` is a multiple of
``chunk_frames`` until :meth:`StreamWriter.finish`, which commits the partial last
chunk and ``scan_finished = true`` in one rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import time
import uuid
import warnings

import numpy as np
import xarray as xr

from ..errors import DatasetError, OptionsError, OutputExistsError, StreamStalledError
from .store import (
    FORMAT_VERSION,
    MAX_FIELD_PX,
    SCHEMA,
    atomic_write_store,
    build_dataset,
    check_intensity,
    check_mask,
    check_position,
    check_probe,
    chunk_key,
    default_scan_chunk,
    error_line,
    missing_chunk,
    validate_dataset,
)

try:
    import fcntl
except ImportError:  # not POSIX: no writer lock, one writer per store is the caller's promise
    fcntl = None

__all__ = ["StreamState", "StreamWriter", "open_writer", "stream_state", "open_frames", "wait_for_frames", "replay", "check_rate"]

#: the root attribute holding the stream's state
STREAM_ATTR = "stream"
#: the arrays the writer appends to; every other array is written once, when the store is created
SCAN_ARRAYS = ("intensity", "position", "scan")
#: the writer's lock file inside the store (hidden: the format's checks skip dot files)
LOCK_NAME = ".stream.lock"


def _utc_now():
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def _parse_utc(text, field):
    if text is None:
        return None
    try:
        t = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise DatasetError(f"attrs.stream.{field}", f"got {text!r}; expected an ISO 8601 UTC time or null") from None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def _read_json(path, where):
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError("metadata", f"{where} cannot be read ({error_line(e)}); re-create the store") from None
    if not isinstance(meta, dict):
        raise DatasetError("metadata", f"{where} holds a JSON {type(meta).__name__}, not an object; re-create the store")
    return meta


def _fsync(path):
    """Flush a file or directory to disk (directories: the names of new files in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _int_or_none(v):
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)


# --------------------------------------------------------------------------- state

@dataclasses.dataclass(frozen=True)
class StreamState:
    """What a store at a path holds now, as far as a reader may rely on it.

    Attributes
    ----------
    exists : bool
        False before the writer has created the store (then every other field is
        zero or None): a reader started before the acquisition waits for it.
    frames_complete : int
        Frames committed: ``intensity[:frames_complete]`` and ``position[:frames_complete]``
        are complete and never change. A multiple of ``chunk_frames`` until the scan
        is finished.
    scan_finished : bool
        The writer has committed its last frame. True for an ordinary (not growing) store.
    n_frames_expected : int or None
        The total the writer announced (``n_frames``), if it did.
    chunk_frames : int or None
        Frames per chunk along ``scan``.
    last_commit_utc : datetime.datetime or None
        When ``frames_complete`` last advanced (the writer's clock, UTC).
    heartbeat_utc : datetime.datetime or None
        The writer's latest sign of life (a commit, an append, :meth:`StreamWriter.heartbeat`).
    streamed : bool
        The store carries the ``stream`` attribute (False: an ordinary store, finished
        by definition).
    """

    exists: bool
    frames_complete: int
    scan_finished: bool
    n_frames_expected: int | None = None
    chunk_frames: int | None = None
    last_commit_utc: datetime.datetime | None = None
    heartbeat_utc: datetime.datetime | None = None
    streamed: bool = False

    def heartbeat_age_s(self, now=None):
        """Seconds since the writer's heartbeat by the reader's clock (``now``, default: the
        current time); None without a heartbeat. Compare the clocks of writer and reader
        before trusting it across machines; :func:`wait_for_frames` uses only the reader's."""
        if self.heartbeat_utc is None:
            return None
        now = now or datetime.datetime.now(datetime.UTC)
        return (now - self.heartbeat_utc).total_seconds()


def _state_from_root(path, root):
    """The :class:`StreamState` that the parsed root ``zarr.json`` ``root`` describes."""
    attrs = root.get("attributes")
    if not isinstance(attrs, dict):
        raise DatasetError("metadata", f"{path}/zarr.json 'attributes' is not a JSON object; re-create the store")
    s = attrs.get(STREAM_ATTR)
    if s is None:
        if not os.path.isfile(os.path.join(path, "intensity", "zarr.json")):
            raise DatasetError("intensity", f"{path} holds no intensity array: not a dataset store (a result or checkpoint?)")
        meta = _read_json(os.path.join(path, "intensity", "zarr.json"), "intensity/zarr.json")
        shape = meta.get("shape")
        try:
            chunk = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        except (KeyError, TypeError, IndexError, ValueError):
            chunk = None
        if not (isinstance(shape, list) and shape and _int_or_none(shape[0]) and shape[0] is not None):
            raise DatasetError("metadata", f"intensity/zarr.json has shape {shape!r}; expected a list of non-negative integers (re-create the store)")
        return StreamState(True, shape[0], True, shape[0], chunk, None, None, False)
    if not isinstance(s, dict):
        raise DatasetError("attrs.stream", f"got {s!r}; expected a JSON object (frames_complete, scan_finished, ...)")
    f = s.get("frames_complete")
    if not (_int_or_none(f) and f is not None):
        raise DatasetError("attrs.stream.frames_complete", f"got {f!r}; expected a non-negative integer")
    if not isinstance(s.get("scan_finished"), bool):
        raise DatasetError("attrs.stream.scan_finished", f"got {s.get('scan_finished')!r}; expected true or false")
    for key in ("n_frames_expected", "chunk_frames"):
        if not _int_or_none(s.get(key)):
            raise DatasetError(f"attrs.stream.{key}", f"got {s.get(key)!r}; expected a non-negative integer or null")
    return StreamState(True, f, s["scan_finished"], s.get("n_frames_expected"), s.get("chunk_frames"),
                       _parse_utc(s.get("last_commit_utc"), "last_commit_utc"), _parse_utc(s.get("heartbeat_utc"), "heartbeat_utc"), True)


def _read_root(path):
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "zarr.json")):
        raise DatasetError("store", f"{path} is not a Zarr v3 store (no zarr.json): give the path of a daskptycho dataset store")
    return _read_json(os.path.join(path, "zarr.json"), "zarr.json of the store")


def stream_state(path) -> StreamState:
    """The state of the (possibly growing) dataset store at ``path``.

    Reads only the root ``zarr.json`` (one atomic file); cheap enough to poll.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    StreamState
        ``exists=False`` (0 frames) if nothing is at ``path`` yet; for an ordinary
        store, ``scan_finished=True`` and ``frames_complete`` its number of patterns.

    Raises
    ------
    DatasetError
        ``path`` exists but is not a Zarr store, or its ``stream`` attribute is malformed.
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        return StreamState(False, 0, False)
    return _state_from_root(path, _read_root(path))


def wait_for_frames(path, frames, *, timeout_s=60.0, poll_s=0.2) -> StreamState:
    """Wait until ``path`` holds at least ``frames`` committed frames or its scan is finished.

    Parameters
    ----------
    path : str or path-like
    frames : int
        Committed frames wanted (``frames_complete >= frames``).
    timeout_s : float
        Seconds, by this process's clock, without any change in the store's state (no
        commit, no heartbeat, no store yet) after which the writer counts as stopped.
    poll_s : float
        Seconds between reads of the state.

    Returns
    -------
    StreamState
        The first state with enough frames or ``scan_finished`` (which may hold fewer).

    Raises
    ------
    StreamStalledError
        Nothing changed for ``timeout_s``; its ``state`` is the last state read.
    """
    path = os.fspath(path)
    last, changed = None, time.monotonic()
    while True:
        st = stream_state(path)
        if st.exists and (st.frames_complete >= frames or st.scan_finished):
            return st
        key = (st.exists, st.frames_complete, st.heartbeat_utc, st.scan_finished)
        if key != last:
            last, changed = key, time.monotonic()
        elif time.monotonic() - changed > timeout_s:
            if not st.exists:
                msg = (f"{path} has not appeared in {timeout_s:g} s: is the acquisition running, and writing to this path? "
                       "(open_writer creates the store before the first frame)")
            else:
                expected = f" of {st.n_frames_expected} expected" if st.n_frames_expected else ""
                msg = (f"the writer of {path} has neither committed frames nor sent a heartbeat for {timeout_s:g} s "
                       f"({st.frames_complete}{expected} frames committed, last commit {st.last_commit_utc or 'none'}): it has probably stopped; "
                       "the committed frames stay readable with open_frames(path), and open_writer(path, resume=True) continues the store")
            raise StreamStalledError(msg, st)
        time.sleep(poll_s)


# --------------------------------------------------------------------------- reading

class _FrameReader:
    """Reads the committed part of one array along ``scan`` for :func:`dask.array.from_array`.

    A chunk file that is missing (Zarr would read fill values) or cannot be decoded
    becomes a :class:`DatasetError` naming the array and the frames, raised where the
    data is read (a dask task, possibly on a worker: the reader pickles without its
    open Zarr array).
    """

    def __init__(self, path, name, meta, shape, dtype):
        self.path, self.name, self.meta = path, name, meta
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self._array = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_array"} | {"_array": None}

    def _open(self):
        if self._array is None:
            import zarr

            self._array = zarr.open_array(os.path.join(self.path, self.name), mode="r")
        return self._array

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        bounds = [k.indices(n)[:2] if isinstance(k, slice) else (int(k), int(k) + 1) for k, n in zip(key, self.shape)]
        first, stop = bounds[0]
        frames = f"frames {first} to {stop - 1}" if stop - first > 1 else f"frame {first}"
        ranges = [range(lo // c, max(lo, hi - 1) // c + 1) for (lo, hi), c in zip(bounds, self.chunks)]
        for coords in np.ndindex(*(len(r) for r in ranges)):
            ck = chunk_key(self.meta, tuple(r[i] for r, i in zip(ranges, coords)))
            if not os.path.isfile(os.path.join(self.path, self.name, ck)):
                raise DatasetError(self.name, f"{frames}: chunk file {self.name}/{ck} is missing although these frames are committed: "
                                   "the store was damaged after they were written; restore the file or acquire these frames again")
        try:
            return np.asarray(self._open()[key])
        except Exception as e:  # noqa: BLE001 - the reading boundary: whatever Zarr or a codec raises on damaged bytes
            raise DatasetError(self.name, f"{frames} cannot be read ({error_line(e)}): a chunk file holding them is truncated or corrupt "
                               "although they are committed; restore the file or acquire these frames again") from None


def _array_metas(path):
    """``{name: parsed zarr.json}`` of every array directory of the store."""
    metas = {}
    with os.scandir(path) as it:
        entries = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    for name in entries:
        f = os.path.join(path, name, "zarr.json")
        if os.path.isfile(f):
            meta = _read_json(f, f"{name}/zarr.json")
            if meta.get("node_type") == "array":
                metas[name] = meta
    return metas


def _open_static(path, scan_names):
    """The store without its arrays along ``scan`` (lazy), which may be mid-resize."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return xr.open_zarr(path, consolidated=False, chunks={}, mask_and_scale=False, drop_variables=list(scan_names))
    except Exception as e:  # noqa: BLE001 - the reading boundary: a damaged store's metadata
        raise DatasetError("metadata", f"the store's Zarr metadata cannot be read ({error_line(e)}); re-create the store") from None


def _frames_array(path, name, meta, n, started=None):
    """A dask array of the first ``n`` entries of array ``name`` along ``scan``; ``started``
    (the stream's creation time) tells two stores written at the same path apart."""
    import dask.array as da
    import zarr
    from dask.base import tokenize

    shape = meta.get("shape")
    if not (isinstance(shape, list) and shape and isinstance(shape[0], int)):
        raise DatasetError("metadata", f"{name}/zarr.json has shape {shape!r}; re-create the store")
    if shape[0] < n:
        raise DatasetError(name, f"has {shape[0]} entries along scan but {n} frames are committed; the store is damaged: re-create it")
    if (meta.get("dimension_names") or [None])[0] != "scan":
        raise DatasetError(name, f"has dims {meta.get('dimension_names')}; expected 'scan' first")
    try:
        dtype = zarr.open_array(os.path.join(path, name), mode="r").dtype
    except Exception as e:  # noqa: BLE001 - the reading boundary: damaged array metadata
        raise DatasetError(name, f"cannot be opened ({error_line(e)}): its metadata is damaged; re-create the store") from None
    if n == 0:
        return da.empty((0,) + tuple(shape[1:]), dtype=dtype)
    reader = _FrameReader(os.path.abspath(path), name, meta, [n] + shape[1:], dtype)
    chunks = tuple(min(c, s) if s else 1 for c, s in zip(reader.chunks, reader.shape))
    # the same committed frames of the same store give the same keys, however far the store has grown
    token = tokenize(reader.path, name, n, started, json.dumps({k: v for k, v in meta.items() if k != "shape"}, sort_keys=True))
    return da.from_array(reader, chunks=chunks, name=f"frames-{name}-{token}", lock=False, fancy=False,
                         asarray=False, meta=np.empty((0,) * reader.ndim, dtype=reader.dtype))


def open_frames(path, start=0, stop=None, *, check_values=True) -> xr.Dataset:
    """The committed frames ``[start, stop)`` of a (possibly growing) dataset store.

    The view a reconstruction that follows an acquisition reads: like
    :func:`daskptycho.open_dataset`, but limited to frames the writer has committed, so
    it works while the store grows, after its writer was killed, and on ordinary stores.

    Parameters
    ----------
    path : str or path-like
    start, stop : int
        Frames ``start <= j < stop``; ``stop`` defaults to ``frames_complete`` read now,
        and may not exceed it.
    check_values : bool
        Read the selected intensities now and refuse NaN, inf and negative values (the
        writer of :func:`open_writer` checked them already: False spares one read).

    Returns
    -------
    xarray.Dataset
        The dataset's variables with ``scan`` of length ``stop - start``; ``scan``
        holds the frames' indices ``start .. stop-1``; ``intensity`` (dask, chunked
        along ``scan`` as the store, the first chunk shorter if ``start`` is not on a
        chunk boundary) and ``position`` (dask over values already read) and the static
        variables lazily. ``attrs["stream"]`` is the state the view was cut at
        (``frames_complete`` >= ``stop``), ``attrs["source"]`` the store's path.

    Raises
    ------
    DatasetError
        The store does not exist yet, is damaged (naming the array and, for a
        truncated or missing chunk, the frames), or holds invalid values.
    OptionsError
        ``start`` or ``stop`` out of range.
    """
    import dask.array as da

    path = os.fspath(path)
    if not os.path.lexists(path):
        raise DatasetError("store", f"{path} does not exist (yet): wait for the writer to create it (daskptycho.io.stream.wait_for_frames)")
    root = _read_root(path)
    st = _state_from_root(path, root)
    n = st.frames_complete
    stop = n if stop is None else stop
    for name, v, lo, hi in (("start", start, 0, n), ("stop", stop, start if _int_or_none(start) else 0, n)):
        if not (_int_or_none(v) and v is not None and lo <= v <= hi):
            raise OptionsError(name, f"got {v!r}; expected an integer in [{lo}, {hi}] ({n} frames are committed)")
    metas = _array_metas(path)
    for name in ("intensity", "position"):
        if name not in metas:
            raise DatasetError(name, f"variable missing; expected {name}{SCHEMA[name][0]}")
    scan_names = [k for k, m in metas.items() if "scan" in (m.get("dimension_names") or ())]
    static = _open_static(path, scan_names)
    for name in static.variables:
        if name in SCHEMA and name in metas:
            key = missing_chunk(path, name, metas[name])
            if key is not None:
                raise DatasetError(name, f"chunk file {name}/{key} is missing (Zarr would read it as fill values); re-create or re-import the store")

    data, coords = {}, {}
    for name in scan_names:
        started = root["attributes"][STREAM_ATTR].get("started_utc") if st.streamed else None
        arr = _frames_array(path, name, metas[name], n, started)[start:stop]
        dims = tuple(metas[name]["dimension_names"])
        attrs = {k: v for k, v in (metas[name].get("attributes") or {}).items() if k != "_FillValue"}
        if name == "scan":
            coords["scan"] = ("scan", arr.compute(scheduler="synchronous"), attrs)
        elif name == "position":
            # small and needed at once (tiling, validation): read now, in this thread
            values = arr.compute(scheduler="synchronous")
            data[name] = (dims, da.from_array(values, chunks=arr.chunks), attrs)
        else:
            data[name] = (dims, arr, attrs)
    ds = static.assign_coords(coords).assign(data)
    if st.streamed:
        ds.attrs[STREAM_ATTR] = root["attributes"][STREAM_ATTR]
    ds.attrs["source"] = os.path.abspath(path)
    if stop == start:
        return ds
    if check_values:
        bad, vmin = da.compute(~da.isfinite(ds["intensity"].data).all(), da.nanmin(ds["intensity"].data))
        if bad:
            raise DatasetError("intensity", f"frames {start} to {stop - 1} contain NaN or inf; expected finite measured intensities")
        if vmin < 0:
            raise DatasetError("intensity", f"frames {start} to {stop - 1} contain negative values (min {float(vmin):.4g}); expected intensities >= 0")
    validate_dataset(ds, check_values=False)
    return ds


# --------------------------------------------------------------------------- writing

def _positive_int(name, v, allow_none=True):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise OptionsError(name, f"got {v!r}; expected a positive integer")
    return int(v)


def check_rate(rate_hz):
    """``rate_hz`` as a float, or an :class:`OptionsError` unless it is a finite positive number
    (frames per second)."""
    try:
        ok = not isinstance(rate_hz, (bool, str)) and math.isfinite(float(rate_hz)) and float(rate_hz) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise OptionsError("rate_hz", f"got {rate_hz!r}; expected a finite positive number of frames per second")
    return float(rate_hz)


class StreamWriter:
    """Appends frames to a growing store in whole chunks; made by :func:`open_writer`.

    One writer per store, used from one thread.

    Attributes
    ----------
    path : str
    window : (int, int)
        ``(N_y, N_x)`` pixels of a pattern.
    pixel_size_m : float
    chunk_frames : int
        Frames per chunk along ``scan``.
    frames_complete : int
        Frames committed (readable by others).
    frames_appended : int
        Frames given to :meth:`append` (committed or buffered).
    finished : bool
    """

    def __init__(self, path, static, chunk_frames, stream, durable=True, heartbeat_s=1.0, lock_fd=None):
        import zarr

        self.path = path
        self.chunk_frames = chunk_frames
        self.durable = durable
        self.heartbeat_s = heartbeat_s
        self._lock_fd = lock_fd
        self._stream = dict(stream)
        self._root = _read_root(path)
        self._arrays = {name: zarr.open_array(os.path.join(path, name), mode="r+", config={"write_empty_chunks": True}) for name in SCAN_ARRAYS}
        self._metas = {name: _read_json(os.path.join(path, name, "zarr.json"), f"{name}/zarr.json") for name in SCAN_ARRAYS}
        self.window = (static.sizes["ky"], static.sizes["kx"])
        self.pixel_size_m = float(static.attrs["pixel_size_m"])
        self._truth_field = None
        if "truth_object" in static and "y" in static.coords and "x" in static.coords:
            self._truth_field = {a: (float(static[a].min()), float(static[a].max())) for a in ("y", "x")}
        self.frames_complete = int(self._stream["frames_complete"])
        self.frames_appended = self.frames_complete
        self.finished = bool(self._stream["scan_finished"])
        self._closed = self.finished
        self._buf_i, self._buf_p = [], []
        self._lo = self._hi = None
        if self.frames_complete:
            committed = np.asarray(self._arrays["position"][: self.frames_complete])
            self._lo, self._hi = committed.min(axis=0), committed.max(axis=0)
        self._last_beat = time.monotonic()

    # ---- lifecycle

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if not self._closed:
                self.finish()
        else:
            self.close()  # an acquisition that failed is not a finished scan
        return False

    def close(self):
        """Stop writing without finishing: buffered frames that do not fill a chunk are
        dropped (not committed); the store stays a growing store that
        ``open_writer(path, resume=True)`` continues from ``frames_complete``."""
        self._buf_i, self._buf_p = [], []
        self._closed = True
        self._release()

    def _release(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def _check_open(self):
        if self.finished:
            raise DatasetError("attrs.stream.scan_finished", f"{self.path}: the scan was finished with {self.frames_complete} frames; "
                               "nothing can be appended after finish(): write another scan to a new store")
        if self._closed:
            raise DatasetError("attrs.stream", f"{self.path}: this writer was closed; continue the store with open_writer(path, resume=True)")

    # ---- appending

    def append(self, intensity, position_m):
        """Append frames; every whole chunk they complete is written and committed now.

        Parameters
        ----------
        intensity : array_like (J, N_y, N_x) or (N_y, N_x)
            Counts (any real dtype, stored as float32), zero frequency at pixel
            ``(N_y//2, N_x//2)``, finite and >= 0. Copied: the caller may reuse its buffer.
        position_m : array_like (J, 2) or (2,)
            Probe centres ``(y, x)`` in metres, in acquisition order.

        Raises
        ------
        DatasetError
            Naming ``intensity`` or ``position`` (shape, values, units) or the stream's
            state (appending after :meth:`finish`); nothing is appended then.
        OptionsError
            More frames than the ``n_frames`` announced.
        """
        self._check_open()
        inten = np.asarray(intensity)
        if inten.ndim == 2:
            inten = inten[None]
        inten = check_intensity(inten)
        j = inten.shape[0]
        if inten.shape[1:] != self.window:
            raise DatasetError("intensity", f"has shape {inten.shape}; expected (J, {self.window[0]}, {self.window[1]}): "
                               "patterns of the store's window")
        inten = inten.astype(np.float32)  # a copy, checked after the conversion (float64 may overflow to inf)
        first = self.frames_appended
        finite = np.isfinite(inten).reshape(j, -1).all(axis=1)
        if not finite.all():
            raise DatasetError("intensity", f"frame {first + int(np.argmin(finite))} contains NaN or inf; expected finite counts "
                               "(set bad pixels to 0 and mask them)")
        low = inten.reshape(j, -1).min(axis=1)
        if (low < 0).any():
            k = int(np.argmin(low))
            raise DatasetError("intensity", f"frame {first + k} has negative values (min {float(low[k]):.4g}); "
                               "expected intensities >= 0 (subtract the background and clip)")
        pos = np.asarray(position_m)
        if pos.ndim == 1:
            pos = pos[None]
        pos = np.array(check_position(pos, j), dtype=np.float64)
        self._check_field(pos, first)
        expected = self._stream.get("n_frames_expected")
        if expected is not None and first + j > expected:
            raise OptionsError("n_frames", f"{first + j} frames appended to {self.path}, more than the {expected} announced; "
                               "announce the true total (or n_frames=None)")
        self._lo = pos.min(axis=0) if self._lo is None else np.minimum(self._lo, pos.min(axis=0))
        self._hi = pos.max(axis=0) if self._hi is None else np.maximum(self._hi, pos.max(axis=0))
        self._buf_i.append(inten)
        self._buf_p.append(pos)
        self.frames_appended += j
        self._write(final=False)
        if time.monotonic() - self._last_beat >= self.heartbeat_s:
            self.heartbeat()

    def _check_field(self, pos, first):
        """The positions so far must span a field an object grid can hold, and lie on the truth's grid."""
        lo = pos.min(axis=0) if self._lo is None else np.minimum(self._lo, pos.min(axis=0))
        hi = pos.max(axis=0) if self._hi is None else np.maximum(self._hi, pos.max(axis=0))
        span = (hi - lo) / self.pixel_size_m + np.asarray(self.window)
        if (span > MAX_FIELD_PX).any():
            raise DatasetError("position", f"with frames {first} to {first + len(pos) - 1} the positions span {span[0]:.4g} x {span[1]:.4g} "
                               f"pixels of {self.pixel_size_m:.4g} m, more than {MAX_FIELD_PX} per axis; expected positions in metres in the sample plane")
        if self._truth_field is not None:
            dx = self.pixel_size_m
            for axis, name in enumerate(("y", "x")):
                lo_t, hi_t = self._truth_field[name]
                out = np.flatnonzero((pos[:, axis] < lo_t - dx) | (pos[:, axis] > hi_t + dx))
                if out.size:
                    raise DatasetError("position", f"frame {first + int(out[0])} at {name} = {pos[out[0], axis]:.4g} m lies outside the truth "
                                       f"object's field [{lo_t:.4g}, {hi_t:.4g}] m; expected positions on the object")

    def flush(self):
        """Write every whole chunk buffered (:meth:`append` already does) and send a
        heartbeat. A partial chunk stays buffered: only :meth:`finish` commits one, so
        ``frames_complete`` stays a multiple of ``chunk_frames`` while the scan runs."""
        self._check_open()
        self._write(final=False)
        self.heartbeat()

    def heartbeat(self):
        """Record that the writer is alive (``stream.heartbeat_utc``) without committing
        frames; call it during pauses longer than a reader's timeout."""
        self._check_open()
        self._commit(self.frames_complete, finished=False, committed=False)

    def finish(self):
        """Commit the buffered frames (the last chunk may be partial) and mark the scan
        finished: the store is then an ordinary dataset store.

        Raises
        ------
        DatasetError
            No frame was ever appended (a dataset store holds at least one pattern).
        """
        self._check_open()
        if self.frames_appended == 0:
            raise DatasetError("intensity", f"{self.path}: no frame was appended; a finished store holds at least one pattern "
                               "(close() leaves it growing)")
        self._write(final=True)
        self.finished = self._closed = True
        self._release()
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.path, LOCK_NAME))

    @property
    def state(self) -> StreamState:
        """The state this writer last committed (no read of the store)."""
        return _state_from_root(self.path, {"attributes": {STREAM_ATTR: self._stream}})

    # ---- the protocol

    def _write(self, final):
        buffered = self.frames_appended - self.frames_complete
        n = buffered if final else buffered - buffered % self.chunk_frames
        if final and n == 0:
            self._commit(self.frames_complete, finished=True)
            return
        if n == 0:
            return
        inten = np.concatenate(self._buf_i) if len(self._buf_i) > 1 else self._buf_i[0]
        pos = np.concatenate(self._buf_p) if len(self._buf_p) > 1 else self._buf_p[0]
        f, g = self.frames_complete, self.frames_complete + n
        # 1. grow every array along scan, 2. write (and flush) the new chunks ...
        for arr in self._arrays.values():
            arr.resize((g,) + tuple(arr.shape[1:]))
        self._arrays["intensity"][f:g] = inten[:n]
        self._arrays["position"][f:g] = pos[:n]
        self._arrays["scan"][f:g] = np.arange(f, g, dtype=self._arrays["scan"].dtype)
        if self.durable:
            self._sync_chunks(f, g)
        # 3. ... and only then count them, in one atomic rename
        self._commit(g, finished=final)
        self._buf_i = [inten[n:]] if n < len(inten) else []
        self._buf_p = [pos[n:]] if n < len(pos) else []

    def _sync_chunks(self, f, g):
        k = self.chunk_frames
        dirs = set()
        for name in SCAN_ARRAYS:
            base = os.path.join(self.path, name)
            ndim = len(self._arrays[name].shape)
            for c in range(f // k, (g - 1) // k + 1):
                file = os.path.join(base, chunk_key(self._metas[name], (c,) + (0,) * (ndim - 1)))
                _fsync(file)
                d = os.path.dirname(file)
                while len(d) > len(base):
                    dirs.add(d)
                    d = os.path.dirname(d)
            _fsync(os.path.join(base, "zarr.json"))
            dirs.add(base)
        for d in sorted(dirs, key=len, reverse=True):
            _fsync(d)

    def _commit(self, frames, finished, committed=True):
        now = _utc_now()
        stream = dict(self._stream, frames_complete=int(frames), scan_finished=bool(finished), heartbeat_utc=now)
        if committed:
            stream["last_commit_utc"] = now
        root = dict(self._root)
        root["attributes"] = dict(root["attributes"], **{STREAM_ATTR: stream})
        tmp = os.path.join(self.path, f".zarr.json.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(json.dumps(root, indent=2).encode("utf-8"))
                fh.flush()
                if self.durable:
                    os.fsync(fh.fileno())
            os.replace(tmp, os.path.join(self.path, "zarr.json"))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if self.durable:
            _fsync(self.path)
        self._stream = stream
        self.frames_complete = int(frames)
        self._last_beat = time.monotonic()


def _lock(path):
    """Take the store's writer lock (released by the kernel when the writer dies);
    a DatasetError if another writer holds it."""
    if fcntl is None:
        return None
    fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DatasetError("store", f"{path}: another writer is appending to this store (it holds {LOCK_NAME}); "
                           "one writer per store: stop it first, or write to another path") from None
    return fd


def _held_by_a_writer(path):
    if fcntl is None or not os.path.isfile(os.path.join(path, LOCK_NAME)):
        return False
    fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _template(window, pixel_size_m, radiation, energy_eV, wavelength_m, mask, probe, truth_object, truth_probe, truth_grid,
              slice_thickness_m, attrs):
    """A one-frame dataset with the store's static variables and attributes, checked by
    :func:`build_dataset` (the frame itself is a placeholder, never written)."""
    if window is None:
        shape = np.shape(probe)[-2:] if probe is not None else np.shape(mask) if mask is not None else None
        if shape is None or len(shape) != 2:
            raise OptionsError("window", "missing; pass window=(N_y, N_x), the detector pixels of one pattern")
        window = shape
    if np.ndim(window) != 1 or len(window) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in window):
        raise OptionsError("window", f"got {window!r}; expected (N_y, N_x), two positive integers")
    ny, nx = int(window[0]), int(window[1])
    if truth_grid is not None:
        centre = np.array([[truth_grid.y[len(truth_grid.y) // 2], truth_grid.x[len(truth_grid.x) // 2]]])
    else:
        centre = np.zeros((1, 2))
    attrs = {k: v for k, v in (attrs or {}).items() if k not in (STREAM_ATTR, "source")}
    return build_dataset(np.zeros((1, ny, nx), np.float32), centre, pixel_size_m=pixel_size_m, radiation=radiation, energy_eV=energy_eV,
                         wavelength_m=wavelength_m, mask=mask, probe=probe, truth_object=truth_object, truth_probe=truth_probe,
                         truth_grid=truth_grid, slice_thickness_m=slice_thickness_m, attrs=attrs, check_values=False)


def _create(path, template, chunk_frames, n_frames, overwrite, durable, heartbeat_s):
    """Write the store with no frame (atomically: it appears complete) and open its writer."""
    validate_dataset(template, check_values=False)
    ny, nx = template.sizes["ky"], template.sizes["kx"]
    k = chunk_frames or default_scan_chunk(n_frames or 2**31, ny * nx * 4)
    empty = template.drop_vars([v for v in template.data_vars if "scan" in template[v].dims and v not in SCAN_ARRAYS])
    if "scan" not in empty.coords:
        empty = empty.assign_coords(scan=np.arange(empty.sizes["scan"]))
    empty = empty.isel(scan=slice(0, 0)).compute()
    now = _utc_now()
    empty.attrs = {key: v for key, v in empty.attrs.items() if key not in (STREAM_ATTR, "source")}
    empty.attrs[STREAM_ATTR] = {"frames_complete": 0, "scan_finished": False, "n_frames_expected": n_frames, "chunk_frames": k,
                                "started_utc": now, "last_commit_utc": None, "heartbeat_utc": now, "format_version": FORMAT_VERSION}
    encoding = {}
    for name, var in empty.variables.items():
        empty[name].encoding = {}
        if var.ndim:
            encoding[name] = {"chunks": tuple(k if d == "scan" else max(var.sizes[d], 1) for d in var.dims)}
    if overwrite and os.path.isdir(path) and _held_by_a_writer(path):
        raise DatasetError("store", f"{path}: a writer is still appending to this store; stop it before replacing the store")
    atomic_write_store(empty, path, overwrite, encoding)
    fd = _lock(path)
    return StreamWriter(path, template, k, empty.attrs[STREAM_ATTR], durable, heartbeat_s, fd)


def _resume(path, given, chunk_frames, n_frames, durable, heartbeat_s):
    """Open the writer of an unfinished growing store again, after checking that what
    the caller gives agrees with the store; frames beyond ``frames_complete`` are dropped."""
    st = stream_state(path)
    if not st.streamed:
        raise DatasetError("attrs.stream", f"{path} is an ordinary dataset store, not a growing one: nothing can be appended to it; "
                           "write to a new path, or pass overwrite=True to replace it")
    if st.scan_finished:
        raise DatasetError("attrs.stream.scan_finished", f"{path}: the scan is finished ({st.frames_complete} frames): "
                           "nothing can be appended; write to a new path, or pass overwrite=True to replace it")
    fd = _lock(path)
    try:
        metas = _array_metas(path)
        static = _open_static(path, [k for k, m in metas.items() if "scan" in (m.get("dimension_names") or ())])
        _check_same(path, static, st, given, chunk_frames, n_frames)
        import zarr

        for name in SCAN_ARRAYS:  # drop what a killed writer left beyond the committed frames
            arr = zarr.open_array(os.path.join(path, name), mode="r+")
            if arr.shape[0] != st.frames_complete:
                arr.resize((st.frames_complete,) + tuple(arr.shape[1:]))
        for root, _dirs, files in os.walk(path):
            for f in files:
                if f.endswith(".partial") or (root == path and f.startswith(".zarr.json.") and f.endswith(".tmp")):
                    os.remove(os.path.join(root, f))  # temporary files of a write that was killed
        stream = _read_root(path)["attributes"][STREAM_ATTR]
        w = StreamWriter(path, static, st.chunk_frames, stream, durable, heartbeat_s, fd)
    except BaseException:
        os.close(fd)
        raise
    w.heartbeat()
    return w


def _check_same(path, static, st, given, chunk_frames, n_frames):
    """Refuse resuming with a geometry (or static variable) other than the store's."""
    if chunk_frames is not None and chunk_frames != st.chunk_frames:
        raise OptionsError("chunk_frames", f"got {chunk_frames}, but {path} has chunks of {st.chunk_frames} frames; pass {st.chunk_frames} or None")
    if n_frames is not None and n_frames != st.n_frames_expected:
        raise OptionsError("n_frames", f"got {n_frames}, but {path} announced {st.n_frames_expected}; pass the same or None")
    window = given.get("window")
    if window is not None and tuple(int(v) for v in window) != (static.sizes["ky"], static.sizes["kx"]):
        raise OptionsError("window", f"got {tuple(window)}, but {path} holds patterns of {static.sizes['ky']} x {static.sizes['kx']}; resume with the same geometry")
    for key in ("radiation", "pixel_size_m", "energy_eV", "wavelength_m", "slice_thickness_m"):
        v = given.get(key)
        have = static.attrs.get(key)
        if v is None:
            continue
        same = v == have if isinstance(v, str) or have is None or isinstance(have, str) else math.isclose(float(v), float(have), rel_tol=1e-9)
        if not same:
            raise DatasetError(f"attrs.{key}", f"got {v!r}, but {path} was written with {have!r}; resume with the same geometry, or write a new store")
    for key, v in (given.get("attrs") or {}).items():
        if key not in (STREAM_ATTR, "source") and static.attrs.get(key) != v:
            raise DatasetError(f"attrs.{key}", f"got {v!r}, but {path} has {static.attrs.get(key)!r}; resume with the same attributes")
    window = (static.sizes["ky"], static.sizes["kx"])
    for name, conv in (("mask", lambda a: check_mask(a, window)), ("probe", lambda a: check_probe(a, window)),
                       ("truth_object", lambda a: np.asarray(a, dtype=np.complex64)),
                       ("truth_probe", lambda a: np.asarray(a, dtype=np.complex64).reshape((-1,) + window))):
        v = given.get(name)
        if v is None:
            continue
        if name not in static or not np.array_equal(conv(v), static[name].values):
            raise DatasetError(name, f"differs from the {name} {path} was written with; resume with the same one (or none)")


def open_writer(path, *, window=None, pixel_size_m=None, radiation=None, energy_eV=None, wavelength_m=None, n_frames=None,
                chunk_frames=None, mask=None, probe=None, truth_object=None, truth_probe=None, truth_grid=None,
                slice_thickness_m=None, attrs=None, like=None, overwrite=False, resume=False, durable=True,
                heartbeat_s=1.0) -> StreamWriter:
    """Create a growing dataset store (or continue one) and return its writer.

    The store appears at ``path`` at once, complete and with 0 frames, so a reader
    started before the first frame sees ``frames_complete = 0``. :meth:`StreamWriter.append`
    buffers frames and commits whole chunks of ``chunk_frames``; :meth:`StreamWriter.finish`
    commits the rest and marks the scan finished. As a context manager the writer
    finishes on a normal exit and only closes (the store stays unfinished) on an exception.

    Parameters
    ----------
    path : str or path-like
        The store (a directory).
    window : (int, int)
        ``(N_y, N_x)`` detector pixels of one pattern (default: the shape of ``probe``
        or ``mask``).
    pixel_size_m, radiation, energy_eV, wavelength_m, mask, probe, truth_object, truth_probe, truth_grid, slice_thickness_m, attrs
        As for :func:`daskptycho.build_dataset`, which checks them.
    n_frames : int, optional
        The number of frames the scan will have; recorded for readers
        (``n_frames_expected``), and appending more is refused.
    chunk_frames : int, optional
        Frames per chunk along ``scan``, the unit of a commit: smaller chunks reach a
        reader sooner; default about 4 MiB of patterns (at most ``n_frames``).
    like : xarray.Dataset, optional
        A dataset whose geometry, attributes and static variables (``mask``, ``probe``,
        ``truth_*``) the store takes, instead of the keywords above; its frames are not
        written (see :func:`replay`).
    overwrite : bool
        Replace an existing store at ``path`` (refused while a writer appends to it).
    resume : bool
        If ``path`` is an unfinished growing store, continue it from its
        ``frames_complete`` (frames a killed writer left beyond are dropped; append
        from frame ``writer.frames_complete`` on); the keywords given must agree with
        the store. If nothing is at ``path``, create the store.
    durable : bool
        fsync every chunk before it is committed, and the commit itself, so a power
        failure cannot commit frames whose bytes did not reach the disk.
    heartbeat_s : float
        Least seconds between heartbeats sent by :meth:`~StreamWriter.append`.

    Returns
    -------
    StreamWriter

    Raises
    ------
    OutputExistsError
        ``path`` exists and neither ``overwrite`` nor ``resume`` was given.
    DatasetError
        A metadata argument is wrong (naming it, as :func:`build_dataset` does); with
        ``resume``, ``path`` is not an unfinished growing store or disagrees with the arguments.
    OptionsError
        ``window``, ``n_frames`` or ``chunk_frames`` is not valid.
    """
    path = os.fspath(path)
    n_frames = _positive_int("n_frames", n_frames)
    chunk_frames = _positive_int("chunk_frames", chunk_frames)
    if not (isinstance(heartbeat_s, (int, float)) and not isinstance(heartbeat_s, bool) and heartbeat_s >= 0):
        raise OptionsError("heartbeat_s", f"got {heartbeat_s!r}; expected a number of seconds >= 0")
    if resume and overwrite:
        raise OptionsError("resume", "resume=True and overwrite=True contradict each other; pass one")
    if os.path.lexists(path) and resume:
        given = {"window": window, "pixel_size_m": pixel_size_m, "radiation": radiation, "energy_eV": energy_eV, "wavelength_m": wavelength_m,
                 "slice_thickness_m": slice_thickness_m, "attrs": attrs, "mask": mask, "probe": probe, "truth_object": truth_object,
                 "truth_probe": truth_probe}
        return _resume(path, given, chunk_frames, n_frames, durable, heartbeat_s)
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists: pass resume=True to continue an unfinished growing store, or overwrite=True to replace it")
    if like is not None:
        validate_dataset(like, check_values=False)
        template = like
    else:
        template = _template(window, pixel_size_m, radiation, energy_eV, wavelength_m, mask, probe, truth_object, truth_probe, truth_grid,
                             slice_thickness_m, attrs)
    return _create(path, template, chunk_frames, n_frames, overwrite, durable, heartbeat_s)


def replay(ds, path, rate_hz, *, chunk_frames=None, overwrite=False, durable=True, progress=None) -> StreamState:
    """Write the frames of ``ds`` into a growing store at ``rate_hz`` frames per second:
    a simulated acquisition, in this process (run it in a thread or a subprocess to
    read the store meanwhile).

    Frame ``j`` is appended at ``(j + 1) / rate_hz`` seconds after the start (later if
    writing falls behind); a chunk is committed when its last frame is appended.

    Parameters
    ----------
    ds : xarray.Dataset
        A valid dataset (:func:`daskptycho.simulate`, :func:`daskptycho.open_dataset`);
        its static variables and attributes go into the store first.
    path : str or path-like
    rate_hz : float
        Frames per second, finite and positive.
    chunk_frames : int, optional
        Frames per chunk (default as :func:`open_writer`).
    overwrite, durable
        As for :func:`open_writer`.
    progress : callable, optional
        Called as ``progress(frames_complete, n_frames)`` after every commit.

    Returns
    -------
    StreamState
        The finished store's state.
    """
    rate_hz = check_rate(rate_hz)
    validate_dataset(ds, check_values=False)
    n = ds.sizes["scan"]
    with open_writer(path, like=ds, n_frames=n, chunk_frames=chunk_frames, overwrite=overwrite, durable=durable) as w:
        t0 = time.monotonic()
        block = max(w.chunk_frames, 1)
        done = 0
        for a in range(0, n, block):
            inten = np.asarray(ds["intensity"][a:a + block].values)
            pos = np.asarray(ds["position"][a:a + block].values)
            for i in range(len(inten)):
                wait = t0 + (a + i + 1) / rate_hz - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                w.append(inten[i:i + 1], pos[i:i + 1])
                if progress is not None and w.frames_complete != done:
                    done = w.frames_complete
                    progress(done, n)
    if progress is not None and w.frames_complete != done:
        progress(w.frames_complete, n)
    return w.state
