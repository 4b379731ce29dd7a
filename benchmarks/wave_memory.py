"""Wave checkpoints in the multislice adjoint: memory against time on a thick sample.

    python -m benchmarks wave_memory [--slices 64 --detector 128 --scan 8x16 --chunk 16 --repeats 3]

One gradient call (:func:`daskptycho.physics.gradients`, cost and every gradient) on a
thick case, 64 slices of 128 px windows, one probe mode, 128 positions, with the wave
checkpoint interval c = 1 (every slice's incident wave kept), 2 and ceil(sqrt(S)), on
two CPU paths:

* the compiled per-position model (Numba, FFTW inside the loop; ``daskptycho.kernels:
  auto`` with pyFFTW), one call for all positions, as ``gradient_sum`` makes it: its
  transient memory is the incident-wave scratch of one position;
* the NumPy path (``daskptycho.kernels: numpy``), one call per chunk of ``--chunk``
  positions (a vectorised call; the engines size chunks by their working-set budget).

Per (path, c): the median seconds of a call over ``--repeats`` warm calls; the peak of
the call's traced memory (``tracemalloc``, which NumPy reports its arrays to; the
gradient accumulators are made before, so only the call's transient memory counts),
the per-position scratch the compiled path allocates, and the working set the engines'
model assumes (:func:`~daskptycho.physics.wave_checkpoints.gradient_working_set`); and
the 2-D FFTs of the call, counted (backend calls and the compiled kernel's tally)
against the model's count (:func:`~daskptycho.physics.wave_checkpoints.gradient_ffts`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import tracemalloc

import numpy as np

from .common import write


def _case(slices, n, scan, seed=0):
    from daskptycho import physics

    rng = np.random.default_rng(seed)
    step = n // 8
    ys, xs = np.meshgrid(np.arange(scan[0]) * step, np.arange(scan[1]) * step, indexing="ij")
    corners = np.stack([ys.ravel(), xs.ravel()], axis=1)
    shape = (int(corners[:, 0].max()) + n, int(corners[:, 1].max()) + n)
    obj = np.exp(1j * rng.uniform(-0.3, 0.3, (slices,) + shape) - rng.uniform(0, 0.02, (slices,) + shape)).astype(np.complex64)
    yy, xx = np.mgrid[:n, :n] - n / 2
    probe = ((np.hypot(yy, xx) < n / 4) * np.exp(1j * 0.002 * (yy ** 2 + xx ** 2)))[None].astype(np.complex64) * 10
    kernel = physics.fresnel_kernel((n, n), 1e-10, 2.5e-12, 2e-10)
    inten = rng.uniform(0, 200, (len(corners), n, n)).astype(np.float32)
    return obj, probe, corners, kernel, inten


def measure(path, obj, probe, corners, kernel, inten, interval, chunk, repeats):
    """One row: median call time, traced peak, FFT count of a gradient call at ``interval``."""
    import dask

    from daskptycho import physics
    from daskptycho.physics import multislice
    from daskptycho.physics import wave_checkpoints as wc

    from .fft_floor import count_ffts

    slices, (k, ny, nx) = obj.shape[0], probe.shape
    j = len(corners) if path == "positions" else chunk
    sel = np.arange(j)
    win = physics.windows(corners[sel], (ny, nx), obj.shape[1:])
    out = {"object": np.zeros_like(obj), "illumination": np.zeros(obj.shape, np.float32),
           "probe": np.zeros_like(probe), "probe_illumination": np.zeros((ny, nx), np.float32)}
    cfg = {"daskptycho.kernels": "auto" if path == "positions" else "numpy"}
    with dask.config.set(cfg):
        def call():
            return physics.gradients(obj, probe, win, kernel, inten, out=out, rows=sel, wave_checkpoints=interval)

        if path == "positions" and not multislice.per_position_path(obj, probe):
            raise RuntimeError("the compiled per-position path is not available (needs Numba and pyFFTW)")
        call()  # warm-up: FFT plans, compilation
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        with count_ffts() as tally:
            call()
        tracemalloc.start()
        try:
            call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    wave = k * ny * nx * 8
    scratch = (multislice.position_scratch_waves(slices, interval) + 1) * wave if path == "positions" else None
    model = wc.gradient_working_set(slices, k, (ny, nx), interval, "positions" if path == "positions" else "batched")
    return {"path": path, "interval": interval, "effective_interval": wc.effective_interval(interval, slices),
            "positions_per_call": j, "s_per_call": statistics.median(times), "runs_s": times,
            "s_per_position": statistics.median(times) / j, "traced_peak_bytes": int(peak),
            "scratch_bytes": scratch, "model_working_set_bytes_per_position": int(model),
            "model_working_set_bytes_per_call": int(model * (1 if path == "positions" else j)),
            "ffts": int(tally["ffts"]), "model_ffts": j * wc.gradient_ffts(slices, k, interval),
            "recomputed_propagations_per_position": wc.recomputed_propagations(slices, interval)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks wave_memory")
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--detector", type=int, default=128)
    p.add_argument("--scan", default="8x16")
    p.add_argument("--chunk", type=int, default=16, help="positions per NumPy-path call")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    import os

    scan = tuple(int(x) for x in a.scan.lower().split("x"))
    obj, probe, corners, kernel, inten = _case(a.slices, a.detector, scan)
    intervals = sorted({1, 2, math.ceil(math.sqrt(a.slices))})
    load0 = os.getloadavg()
    rows = []
    t_start = time.perf_counter()
    for path in ("positions", "numpy"):
        for c in intervals:
            r = measure(path, obj, probe, corners, kernel, inten, c, a.chunk, a.repeats)
            rows.append(r)
            scratch = "" if r["scratch_bytes"] is None else f", scratch {r['scratch_bytes'] / 2**20:.2f} MiB"
            print(f"{path:9s} c={c:2d}: {r['s_per_call']:.3f} s per call ({r['positions_per_call']} positions), "
                  f"traced peak {r['traced_peak_bytes'] / 2**20:.1f} MiB{scratch}, "
                  f"FFTs {r['ffts']} (model {r['model_ffts']})", flush=True)
    for r in rows:
        base = next(x for x in rows if x["path"] == r["path"] and x["interval"] == 1)
        r["time_relative_to_keep_all"] = r["s_per_call"] / base["s_per_call"]
        r["peak_relative_to_keep_all"] = r["traced_peak_bytes"] / base["traced_peak_bytes"]
        r["ffts_relative_to_keep_all"] = r["ffts"] / base["ffts"]
    path = write("wave_memory", {
        "case": {"slices": a.slices, "detector": a.detector, "modes": int(probe.shape[0]), "positions": len(corners),
                 "scan": list(scan), "object_px": list(obj.shape[1:]), "numpy_chunk": a.chunk, "repeats": a.repeats},
        "intervals": intervals, "rows": rows, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "seconds": time.perf_counter() - t_start,
        "command": "python -m benchmarks wave_memory " + " ".join(argv or []),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
