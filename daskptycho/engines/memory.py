"""What a run's workers held: a baseline after warm-up, the peak above it, each unit's bytes.

:func:`warm_up` and :func:`peak_rss` run on the workers (``client.run``); :func:`report`
puts their figures beside the bytes each tile (or part) holds.
"""

from __future__ import annotations

import numpy as np

from ..backend import gpu_pool_bytes


def warm_up():
    """Import the engine modules, run a tiny FFT and load the compiled CPU kernels
    (:func:`daskptycho.physics.fused.warm_up`); reset the peak-RSS mark and return this
    worker's RSS (bytes), the baseline the peak is measured above (so it counts arrays,
    not modules)."""
    import psutil

    from .. import backend
    from ..physics import fused
    from ..tasks import dm, ml, tiles  # noqa: F401  (imported before the baseline is read)

    backend.fft2(np.ones((2, 8, 8), np.complex64))
    fused.warm_up()
    reset_peak()
    return psutil.Process().memory_info().rss


def reset_peak():
    """Reset this process's peak-RSS mark (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss():
    """High-water mark of this worker process's resident memory (bytes) since the
    baseline: VmHWM (reset at warm-up) where /proc exists. Not ``ru_maxrss``: that
    survives execve, so a worker would inherit the peak of the process that started it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def report(client, baseline, unit_bytes, unit_workers):
    """Bytes each unit holds and each worker's measured peak resident memory.

    Parameters
    ----------
    client : distributed.Client
    baseline : dict ``{worker: bytes}``, RSS after :func:`warm_up`
    unit_bytes : dict ``{(r, c): {what: bytes}}``
    unit_workers : dict ``{(r, c): worker}``

    Returns
    -------
    dict with ``tile_bytes``, ``worker_peak_rss_bytes``, ``worker_peak_above_baseline_bytes``
    (what the run's arrays, state and transients took at their largest) and ``tile_workers``.
    """
    # a worker that died after the run's results were in has no peak to report
    peak = {w: v for w, v in client.run(peak_rss, on_error="return").items() if not isinstance(v, BaseException)}
    out = {
        "tile_bytes": {f"{k[0]},{k[1]}": b for k, b in unit_bytes.items()},
        "worker_peak_rss_bytes": {w: int(v) for w, v in peak.items()},
        "worker_peak_above_baseline_bytes": {w: int(v - baseline.get(w, 0)) for w, v in peak.items()},
        "tile_workers": {f"{k[0]},{k[1]}": w for k, w in unit_workers.items()},
    }
    pool = {w: v for w, v in client.run(gpu_pool_bytes, on_error="return").items() if not isinstance(v, BaseException) and v}
    if pool:  # device arrays: CuPy's pool keeps what it once allocated, its size is the high-water mark
        out["worker_gpu_pool_bytes"] = {w: int(v) for w, v in pool.items()}
    return out


def unit_bytes(state, data, *more):
    """Bytes a unit holds (runs on its worker): ``object`` (its patch, or the single-task
    engine's whole object), ``buffer`` (the accumulated gradient, complex, and illumination,
    real, of the same extent), ``patterns``; for a dm part ``views``, ``patterns``,
    ``object`` (its crop)."""
    if more:  # dm: views, patterns, crop
        return {"views": int(state.nbytes), "patterns": int(data.nbytes), "object": int(more[0].nbytes)}
    obj = int((state["object"] if isinstance(state, dict) else state).nbytes)
    return {"object": obj, "buffer": obj + obj // 2, "patterns": int(data.nbytes)}
