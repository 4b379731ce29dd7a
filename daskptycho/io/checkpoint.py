"""Checkpoints inside a result store: pure I/O (no Dask client here).

Layout (see ``docs/format.md``)::

    <out>/zarr.json                 root group (format "daskptycho-checkpoint" until the result replaces it)
    <out>/checkpoint/zarr.json      group whose attribute ``latest`` names the last complete checkpoint
    <out>/checkpoint/it-000005/     one group per checkpoint: arrays (tile patches, probe, views ...) + attrs

A checkpoint is written in three steps: :meth:`Checkpoint.begin` creates the group
and its arrays (metadata only); tasks on the workers fill each array with
:func:`write_arrays` (a tile's patch never travels to the client); then
:meth:`Checkpoint.commit` writes the small arrays and attributes and atomically
replaces ``checkpoint/zarr.json`` (temporary file + ``os.replace``) so that it names
the new group, and removes the older groups. A run killed at any moment leaves the
pointer naming a checkpoint whose arrays were all written.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import numpy as np

from ..backend import array_module, to_numpy
from ..errors import DatasetError, OptionsError

CHECKPOINT_FORMAT_NAME = "daskptycho-checkpoint"
GROUP = "checkpoint"
CHUNK_BYTES = 16 * 2**20  # zarr chunk target: a worker writes and reads its arrays a chunk at a time

# options that may differ between a run and its resumption (they do not change the result)
RESUMABLE = ("iterations", "checkpoint", "checkpoint_every", "resume", "workers")


def _write_json_atomic(path, obj):
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _group_json(attrs):
    return {"zarr_format": 3, "node_type": "group", "attributes": attrs}


def _chunks(shape, dtype):
    """Chunks along the first axis of about :data:`CHUNK_BYTES` (whole other axes)."""
    if not shape:
        return ()
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    return (int(max(1, min(shape[0], CHUNK_BYTES // max(row, 1)))),) + tuple(int(s) for s in shape[1:])


def group_name(completed):
    return f"it-{int(completed):06d}"


class Checkpoint:
    """The checkpoints kept in the result store ``store``.

    Parameters
    ----------
    store : str or path-like
        The result store (the command line's ``--out``); it is created (as a bare Zarr group) by the
        first :meth:`begin` if it does not exist.
    """

    def __init__(self, store):
        self.store = os.path.abspath(os.fspath(store))
        self.root = os.path.join(self.store, GROUP)

    # ------------------------------------------------------------------ reading
    def latest(self):
        """The attributes of the last complete checkpoint (with ``group``, its path), or None."""
        meta = os.path.join(self.root, "zarr.json")
        if not os.path.exists(meta):
            return None
        try:
            with open(meta) as f:
                name = json.load(f).get("attributes", {}).get("latest")
        except (OSError, ValueError) as e:
            raise DatasetError("checkpoint", f"{meta} cannot be read ({type(e).__name__}); the checkpoint is damaged: start again without resume") from None
        if not name:
            return None
        path = os.path.join(self.root, name)
        try:
            with open(os.path.join(path, "zarr.json")) as f:
                attrs = json.load(f)["attributes"]
        except (OSError, ValueError, KeyError) as e:
            raise DatasetError("checkpoint", f"the latest checkpoint {path} cannot be read ({type(e).__name__}): start again without resume") from None
        if not attrs.get("complete"):
            raise DatasetError("checkpoint", f"{path} is named as latest but not marked complete: start again without resume")
        return dict(attrs, group=path)

    def read(self, meta, name):
        """A (small) array of a checkpoint, on the caller (probe, costs ...)."""
        return read_array(meta["group"], name)

    # ------------------------------------------------------------------ writing
    def clear(self):
        """Remove every checkpoint of this store (a fresh run replacing an older one)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def prune(self):
        """Remove every checkpoint group but the latest complete one (partial ones a
        killed run left behind); before a resumed run writes its own."""
        latest = self.latest()
        keep = os.path.basename(latest["group"]) if latest else None
        if os.path.isdir(self.root):
            for name in os.listdir(self.root):
                if name.startswith("it-") and name != keep:
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def begin(self, completed, arrays):
        """Create the group of the checkpoint after ``completed`` iterations.

        Parameters
        ----------
        completed : int
        arrays : dict ``{name: (shape, dtype)}``, the arrays tasks will fill

        Returns
        -------
        str, the group's path (what :func:`write_arrays` takes)
        """
        import zarr

        if not os.path.exists(os.path.join(self.store, "zarr.json")):
            os.makedirs(self.store, exist_ok=True)
            _write_json_atomic(os.path.join(self.store, "zarr.json"), _group_json({"format": CHECKPOINT_FORMAT_NAME}))
        if not os.path.exists(os.path.join(self.root, "zarr.json")):
            os.makedirs(self.root, exist_ok=True)
            _write_json_atomic(os.path.join(self.root, "zarr.json"), _group_json({"latest": None}))
        path = os.path.join(self.root, group_name(completed))
        latest = self.latest()
        if latest is not None and latest["group"] == path:
            raise DatasetError("checkpoint", f"{path} is the latest complete checkpoint and would be overwritten")
        shutil.rmtree(path, ignore_errors=True)  # a partial one left by a killed run
        g = zarr.open_group(path, mode="w", zarr_format=3)
        for name, (shape, dtype) in arrays.items():
            g.create_array(name, shape=tuple(int(s) for s in shape), chunks=_chunks(shape, dtype), dtype=np.dtype(dtype))
        return path

    def commit(self, path, attrs, small=None):
        """Finish the checkpoint at ``path``: write ``small`` arrays (from the caller)
        and ``attrs``, point ``latest`` at it atomically, remove the older checkpoints."""
        import zarr

        if small:
            write_arrays(path, small, create=True)
        g = zarr.open_group(path, mode="r+")
        g.attrs.update(_jsonable(dict(attrs, complete=True)))
        _write_json_atomic(os.path.join(self.root, "zarr.json"), _group_json({"latest": os.path.basename(path)}))
        mine = os.path.basename(path)
        for name in os.listdir(self.root):
            # older ones only: a newer one may be being written already
            if name.startswith("it-") and name < mine:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


# ---------------------------------------------------------------------- task functions (run on workers)

def write_arrays(group, arrays, create=False):
    """Write arrays (NumPy or CuPy) into the pre-created arrays of a checkpoint group.

    Runs on the worker that holds them, so a tile's patch goes straight from its
    worker's memory to the store.

    Parameters
    ----------
    group : str, the checkpoint group's path
    arrays : dict ``{name: array}``
    create : bool
        Create the arrays first (small arrays written by the client).

    Returns
    -------
    int, bytes written
    """
    import zarr

    n = 0
    for name, value in arrays.items():
        value = np.ascontiguousarray(to_numpy(value))
        path = os.path.join(group, name)
        if create:
            z = zarr.create_array(path, shape=value.shape, chunks=_chunks(value.shape, value.dtype) or None,
                                  dtype=value.dtype, zarr_format=3, overwrite=True)
        else:
            z = zarr.open_array(path, mode="r+")
            if z.shape != value.shape or z.dtype != value.dtype:
                raise DatasetError(f"checkpoint.{name}", f"has shape {z.shape} {z.dtype}, the state {value.shape} {value.dtype}")
        z[...] = value
        n += value.nbytes
    return n


def write_array(group, name, value):
    """Write one array (a tile's patch, the probe) into its pre-created array; on the worker holding it."""
    return write_arrays(group, {name: value})


def write_state(group, state, names):
    """Write ``state[name]`` for each name (a dict state held by one worker)."""
    return write_arrays(group, {n: state[n] for n in names})


def read_array(group, name, region=None, device="cpu"):
    """Read an array of a checkpoint (on the worker that will hold it).

    Parameters
    ----------
    region : (y0, y1, x0, x1), optional: only this window of the last two axes
    device : "cpu" or "gpu"
    """
    import zarr

    try:
        z = zarr.open_array(os.path.join(group, name), mode="r")
    except Exception as e:
        raise DatasetError(f"checkpoint.{name}", f"cannot be read from {group} ({type(e).__name__}): start again without resume") from None
    if region is None:
        a = z[...]
    else:
        y0, y1, x0, x1 = region
        a = z[..., y0:y1, x0:x1]
    a = np.ascontiguousarray(a)
    if device == "cpu":
        return a
    return array_module(device).asarray(a)


def read_state(group, names, device="cpu"):
    """``{name: array}`` for each name (a single-task engine's state)."""
    return {n: read_array(group, n, device=device) for n in names}


# ---------------------------------------------------------------------- resuming

def check_resume(meta, options, engine, store, defaults=None):
    """Check a checkpoint against the options of the run that resumes it.

    Parameters
    ----------
    meta : dict or None, :meth:`Checkpoint.latest`
    options : dict, every option of the resuming run
    engine : str
    defaults : dict, optional
        The engine's option defaults: an option the checkpoint does not record (made by
        an older daskptycho) passes when the run leaves it at its default, which is
        what that version did.

    Raises
    ------
    OptionsError
        No checkpoint; a result-changing option differs (named); nothing left to do.
    """
    if meta is None:
        raise OptionsError("resume", f"{store} holds no complete checkpoint: run without resume=True, with checkpoint_every=K")
    stored = meta.get("options") or {}
    if isinstance(stored, str):
        stored = json.loads(stored)
    current = _jsonable(options)
    if meta.get("engine") != engine:
        raise OptionsError("engine", f"the checkpoint in {store} is of engine {meta.get('engine')!r}, this run {engine!r}; resume with the same engine")
    defaults = _jsonable(defaults or {})
    for key in sorted(set(stored) | set(current)):
        if key in RESUMABLE:
            continue
        if key not in stored and key in defaults and current.get(key) == defaults[key]:
            continue
        if stored.get(key) != current.get(key):
            raise OptionsError(key, f"is {current.get(key)!r} but the checkpoint in {store} was made with {stored.get(key)!r}; "
                               "resume with the same value (only iterations, workers and checkpoint_every may change)")
    done = int(meta["completed"])
    if done >= int(options["iterations"]):
        raise OptionsError("iterations", f"the run in {store} already completed {done} iterations (finished); "
                           f"give more than {done} iterations to continue it")
