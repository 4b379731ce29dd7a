"""Diffraction patterns as the engines take them: float32, FFT order, read a chunk at a time."""

from __future__ import annotations

import numpy as np

from .store import open_dataset
from .stream import open_frames, stream_state


def load_patterns(ds, scan_indices=None):
    """Intensities of the given scan points as float32 in FFT order (zero frequency at [0, 0]).

    Reads one stored chunk at a time into the output, so the peak memory is the
    selected patterns plus one chunk, whatever the size of the store.

    Returns
    -------
    float32 array (J, N, N)
    """
    data = ds["intensity"].data
    n = data.shape[0]
    idx = np.arange(n) if scan_indices is None else np.asarray(scan_indices, dtype=np.int64)
    out = np.empty((idx.size,) + tuple(data.shape[1:]), dtype=np.float32)
    bounds = np.cumsum((0,) + tuple(data.chunks[0])) if hasattr(data, "chunks") and data.chunks else np.array([0, n])
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        take = np.flatnonzero((idx >= lo) & (idx < hi))
        if take.size == 0:
            continue
        block = data.blocks[b] if hasattr(data, "blocks") else data[lo:hi]
        block = np.asarray(block.compute(scheduler="synchronous") if hasattr(block, "compute") else block)
        out[take] = np.fft.ifftshift(block[idx[take] - lo], axes=(-2, -1))
    return out


def load_patterns_from_store(path, scan_indices=None):
    """Read patterns straight from a store; runs on the worker that owns them. A store
    still being written (:mod:`daskptycho.io.stream`) is read through its committed
    frames, so a worker can take its frames while the acquisition goes on."""
    if not stream_state(path).scan_finished:
        return load_patterns(open_frames(path, check_values=False), scan_indices)
    return load_patterns(open_dataset(path, check_values=False), scan_indices)
