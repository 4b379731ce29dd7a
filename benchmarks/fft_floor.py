"""The machine's limit: batched complex64 2-D FFT rate and the FFT floor of one iteration.

    python -m benchmarks fft_floor [--sizes 64,128,256 --batches 1,9,18,64 --repeats 7]

1. Throughput of batched complex64 2-D FFTs (one thread, as each Dask worker thread
   runs one task) with numpy.fft, scipy.fft, pyFFTW with a reused plan (out of place
   and in place, the engines' way) and cupy.fft when a GPU is there: median of
   ``--repeats`` runs after a warm-up, in microseconds per 2-D transform.
2. A streaming bandwidth (``numpy.add(b, c, out=a)`` on float32 arrays far larger
   than the caches; 12 bytes moved per element), the rate of the elementwise work.
3. The FFTs of one iteration of the multislice model (forward and gradient), counted
   by instrumenting :func:`daskptycho.backend.fft2` / ``ifft2`` during one real
   ``ml`` step on the engines benchmark's dataset (:mod:`benchmarks.engines`), and
   turned into a floor: ``FFT count x best time per FFT``. The engines benchmark
   divides this floor by each engine's measured time per iteration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import numpy as np

from .common import write

# The dataset every engine is timed on (benchmarks/engines.py uses the same).
DATASET = dict(kind="pbtio3", scan=(32, 32), detector=128, slices=4)


def _median_time(fn, repeats):
    fn()  # warm-up: plans, page faults
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def fft_rates(sizes, batches, repeats):
    """Rows ``{library, n, batch, us_per_fft, gflops}`` (one thread)."""
    import scipy.fft

    rows = []
    rng = np.random.default_rng(0)
    try:
        import pyfftw
    except ImportError:
        pyfftw = None
    for n in sizes:
        for b in batches:
            shape = (b, n, n)
            a = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
            libs = {
                "numpy.fft": lambda a=a: np.fft.fft2(a),
                "scipy.fft": lambda a=a: scipy.fft.fft2(a, workers=1),
            }
            if pyfftw is not None:
                src = pyfftw.empty_aligned(shape, dtype=np.complex64)
                src[...] = a
                dst = pyfftw.empty_aligned(shape, dtype=np.complex64)
                plan = pyfftw.FFTW(pyfftw.empty_aligned(shape, dtype=np.complex64), pyfftw.empty_aligned(shape, dtype=np.complex64),
                                   axes=(-2, -1), threads=1, flags=("FFTW_MEASURE",))
                inplace = pyfftw.FFTW(src, src, axes=(-2, -1), threads=1, flags=("FFTW_MEASURE",))
                src[...] = a  # FFTW_MEASURE planning overwrote it
                plan.update_arrays(src, dst)
                libs["pyfftw (reused plan)"] = plan.execute
                libs["pyfftw (reused plan, in place)"] = inplace.execute
            gpu = _cupy()
            if gpu is not None:
                ga = gpu.asarray(a)

                def run_gpu(ga=ga, gpu=gpu):
                    gpu.fft.fft2(ga)
                    gpu.cuda.Device().synchronize()
                libs["cupy.fft"] = run_gpu
            for name, fn in libs.items():
                t = _median_time(fn, repeats)
                us = t / b * 1e6
                flops = 5 * n * n * np.log2(n * n)  # the conventional radix-2 count of one complex 2-D FFT
                rows.append({"library": name, "n": n, "batch": b, "us_per_fft": us, "gflops": flops / (us * 1e-6) / 1e9})
                print(f"  {name:32s} n={n:4d} batch={b:3d}: {us:9.1f} us per FFT, {rows[-1]['gflops']:6.2f} GFLOP/s", flush=True)
    return rows


def _cupy():
    try:
        import cupy

        if cupy.is_available():
            return cupy
    except Exception:  # noqa: BLE001 - any CUDA import or driver problem means no GPU here
        pass
    return None


def stream_bandwidth(repeats, mib=256):
    """Bytes per second of ``a = b + c`` on float32 arrays of ``mib`` MiB each."""
    n = mib * 2**20 // 4
    b = np.ones(n, np.float32)
    c = np.ones(n, np.float32)
    a = np.empty(n, np.float32)
    t = _median_time(lambda: np.add(b, c, out=a), repeats)
    return 3 * 4 * n / t


@contextmanager
def count_ffts():
    """Count every 2-D FFT the package computes inside the block.

    Wraps ``daskptycho.backend._transform`` (behind ``fft2`` and ``ifft2``): yields a
    dict filled with ``calls``, ``ffts`` (2-D transforms: batch sizes summed),
    ``by_size`` ({N: count}), ``bytes`` (each transform's array read and written once) and
    ``seconds`` (time inside the FFT calls through the backend), and ``compiled_ffts``
    (those computed inside the compiled per-position kernels, counted by them).
    """
    from daskptycho import backend

    orig = backend._transform
    tally = {"calls": 0, "ffts": 0, "by_size": {}, "bytes": 0}

    tally["seconds"] = 0.0

    def counting(a, forward, xp, out, norm):
        batch = int(np.prod(a.shape[:-2])) if a.ndim > 2 else 1
        n = int(a.shape[-1])
        tally["calls"] += 1
        tally["ffts"] += batch
        tally["by_size"][n] = tally["by_size"].get(n, 0) + batch
        tally["bytes"] += 2 * a.nbytes
        t0 = time.perf_counter()
        res = orig(a, forward, xp, out, norm)
        tally["seconds"] += time.perf_counter() - t0
        return res

    from daskptycho.physics import fused

    before = {"calls": fused.FFT_TALLY["calls"], "by_size": dict(fused.FFT_TALLY["by_size"])}
    backend._transform = counting
    try:
        yield tally
    finally:
        backend._transform = orig
        # FFTs run inside the compiled per-position kernels (not timed separately: "seconds"
        # covers only the FFTs called through the backend)
        tally["calls"] += fused.FFT_TALLY["calls"] - before["calls"]
        tally["compiled_ffts"] = 0
        for n, c in fused.FFT_TALLY["by_size"].items():
            c -= before["by_size"].get(n, 0)
            if c:
                tally["compiled_ffts"] += c
                tally["ffts"] += c
                tally["by_size"][n] = tally["by_size"].get(n, 0) + c
                tally["bytes"] += 2 * c * n * n * 8  # complex64, read and written once


def iteration_fft_count(ds, slices, repeats=3):
    """FFTs of one ``ml`` iteration (forward model and gradient of every position) on ``ds``,
    counted on a real step in this process, and where the step's time goes.

    The step runs on the default CPU path (``daskptycho.kernels: auto``: the compiled
    per-position model when Numba and pyFFTW are installed, FFTs inside the compiled
    loop) and on the NumPy reference path (``daskptycho.kernels: numpy``: batched FFTs
    through the backend, timed call by call, elementwise NumPy passes between them);
    medians of ``repeats`` warm steps of each, alternated so both see the same machine.
    """
    import dask

    from daskptycho.engines import engine_options
    from daskptycho.engines.problem import prepare
    from daskptycho.io.patterns import load_patterns
    from daskptycho.physics import fused, multislice
    from daskptycho.tasks.ml import ml_init, ml_step

    opts = engine_options(dict(engine="ml", slices=slices, iterations=1))
    problem = prepare(ds, opts)
    data = load_patterns(ds)
    state = ml_step(ml_init(problem), data, 0, problem)  # warm-up: plans, compilation, first-touch pages
    paths = {"default": {}, "numpy": {"daskptycho.kernels": "numpy"}}
    times = {k: [] for k in paths}
    tallies = {}
    for _ in range(repeats):
        for name, cfg in paths.items():
            with dask.config.set(cfg):
                if name not in tallies:
                    ml_step(state, data, 1, problem)  # warm this path too
                with count_ffts() as tally:
                    t0 = time.perf_counter()
                    ml_step(state, data, 1, problem)
                    times[name].append(time.perf_counter() - t0)
                tallies[name] = tally
    tally = dict(tallies["default"])
    with dask.config.set(paths["default"]):
        tally["path"] = ("compiled per-position model (Numba, FFTW inside the loop)"
                         if multislice.per_position_path(state["object"], problem.probe)
                         else "fused per-slice kernels (Numba), batched FFTs" if fused.kernels() is not None else "NumPy")
    tally["step_seconds"] = statistics.median(times["default"])
    ref = tallies["numpy"]
    assert ref["ffts"] == tally["ffts"], (ref["ffts"], tally["ffts"])  # both paths compute the same transforms
    # where a NumPy-path step's time goes: inside the FFT calls and the rest (elementwise
    # products, window cut/add, cost), at this moment's machine load
    step = statistics.median(times["numpy"])
    tally["numpy_path"] = {"step_seconds": step, "fft_seconds": ref["seconds"], "fft_share_of_step": ref["seconds"] / step,
                           "us_per_fft_in_step": ref["seconds"] / ref["ffts"] * 1e6}
    tally["repeats"] = repeats
    tally["positions"] = int(problem.n_positions)
    tally["ffts_per_position_per_slice"] = tally["ffts"] / problem.n_positions / slices
    return tally


def us_per_fft_now(n, repeats=300):
    """This moment's time (us) of one 2-D complex64 FFT of ``n`` x ``n`` with a reused
    pyFFTW plan (scipy.fft without pyFFTW): median of ``repeats`` executions, a
    fraction of a second. Benchmarks take it just before a timed run, so a floor from it
    sees the same machine as the run (the shared machine's speed drifts by tens of per
    cent over minutes)."""
    a = np.ones((1, n, n), np.complex64)
    try:
        import pyfftw
    except ImportError:
        import scipy.fft

        return _median_time(lambda: scipy.fft.fft2(a, workers=1), repeats) * 1e6
    src = pyfftw.empty_aligned(a.shape, dtype=np.complex64)
    dst = pyfftw.empty_aligned(a.shape, dtype=np.complex64)
    plan = pyfftw.FFTW(src, dst, axes=(-2, -1), threads=1, flags=("FFTW_MEASURE",))
    src[...] = a
    return _median_time(plan.execute, repeats) * 1e6


def best_us_per_fft(rows, n):
    """The fastest measured time per 2-D FFT of size ``n`` on the CPU (any library, any batch)."""
    cpu = [r["us_per_fft"] for r in rows if r["n"] == n and r["library"] != "cupy.fft"]
    return min(cpu)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks fft_floor")
    p.add_argument("--sizes", default="64,128,256")
    p.add_argument("--batches", default="1,9,18,64")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--scan", type=int, default=DATASET["scan"][0])
    p.add_argument("--out", default="fft_floor", help="result name: benchmarks/results/NAME.json")
    a = p.parse_args(argv)

    import daskptycho as dp
    from daskptycho.backend import fft_backend

    load = os.getloadavg()
    sizes = [int(v) for v in a.sizes.split(",")]
    batches = [int(v) for v in a.batches.split(",")]
    print("FFT throughput (complex64, one thread):", flush=True)
    rows = fft_rates(sizes, batches, a.repeats)
    bw = stream_bandwidth(a.repeats)
    print(f"stream bandwidth (a = b + c, float32): {bw / 1e9:.2f} GB/s", flush=True)

    cfg = dict(DATASET, scan=(a.scan, a.scan))
    ds = dp.simulate(**cfg)
    tally = iteration_fft_count(ds, cfg["slices"])
    n = cfg["detector"]
    best = best_us_per_fft(rows, n)
    floor_fft = tally["ffts"] * best * 1e-6
    # the FFTs' own memory traffic at the streaming rate: a bound the FFT time cannot beat
    floor_fft_bytes = tally["bytes"] / bw
    speedups = {}
    for lib in ("numpy.fft", "scipy.fft", "pyfftw (reused plan)"):
        vals = [r["us_per_fft"] for r in rows if r["library"] == lib and r["n"] == n]
        if vals:
            speedups[lib] = min(vals)
    npath = tally["numpy_path"]
    print(f"in-process ml step ({tally['path']}): {tally['step_seconds']:.3f} s; NumPy path {npath['step_seconds']:.3f} s, "
          f"{npath['fft_share_of_step']:.0%} inside FFT calls ({npath['us_per_fft_in_step']:.1f} us per FFT there)", flush=True)
    print(f"one iteration on {cfg}: {tally['ffts']} FFTs of {n} px ({tally['ffts_per_position_per_slice']:.2f} per position "
          f"per slice), {tally['bytes'] / 2**30:.2f} GiB through the FFTs; floor {floor_fft:.3f} s "
          f"(best {best:.1f} us per FFT); the same bytes at stream bandwidth {floor_fft_bytes:.3f} s", flush=True)
    path = write(a.out, {
        "loadavg_start": load, "loadavg_end": os.getloadavg(),
        "fft_backend_in_use": fft_backend(),
        "repeats": a.repeats, "fft_rates": rows,
        "best_us_per_fft_cpu": {str(s): best_us_per_fft(rows, s) for s in sizes},
        "best_us_per_fft_by_library": {k: v for k, v in speedups.items()},
        "stream_bandwidth_bytes_per_s": bw,
        "dataset": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "iteration": {k: v for k, v in tally.items()},
        "floor_s_per_iteration": floor_fft,
        "fft_bytes_at_stream_bandwidth_s": floor_fft_bytes,
        "command": "python -m benchmarks fft_floor " + " ".join(argv or []),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
