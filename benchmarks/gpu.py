"""The GPU benchmarks: the device's FFT floor, every engine against it, GPU memory, and
a strip's transfer between GPU workers over TCP and UCX.

    python -m benchmarks gpu [--quick] [--out gpu] [--steps floor,ml,engines,dm,transfer]

Run on a machine with a CUDA GPU (``bash benchmarks/gpu.sh`` on a lent device machine).
Every figure is a steady-state median (the first iterations excluded), measured on this
machine's GPU, which the JSON names. Cases:

``floor``
    cuFFT (through ``cupyx.scipy.fft``, in place, plans cached) on batches of complex64
    2-D transforms of each case's size: microseconds per transform, timed with CUDA events.
``ml``
    The reference engine on the issue's case: PbTiO3, 48 x 48 scan (2304 positions),
    128 px patterns, 8 slices, full batch. Timed twice: its task function in this
    process (the device hot path alone: :func:`daskptycho.tasks.ml.ml_step`) and
    through ``dp.reconstruct`` on a one-worker LocalCluster (the engine as users run it).
    The FFT floor of an iteration is ``positions x modes x (4 slices - 2) x`` the
    cuFFT time per transform (forward: one transform into and one out of every slice
    gap plus the far field; the adjoint the same).
``engines``
    gd 2 x 2 (four workers sharing the GPU, and one worker holding all four tiles) and hve
    2 x 2 on the same case, each against ml.
``dm``
    The second paper's scale: 10,000 positions (100 x 100 scan) of 192 x 192 patterns,
    4 probe modes, 50 iterations, one worker: the wall time of the 50 iterations.
``transfer``
    A strip (2 slices x 128 rows x 1024 px complex64, 2 MiB, and a 32 MiB one) moved from
    one GPU worker to another on a ``dask_cuda.LocalCUDACluster`` over TCP and over UCX
    (when distributed-ucxx is installed): median seconds per move.

Writes ``benchmarks/results/<out>.json`` after every case (a killed run keeps what it had).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from .common import machine, write

ML_CASE = dict(kind="pbtio3", scan=(48, 48), detector=128, slices=8, max_angle_rad=60e-3, defocus_m=60e-10)
DM_CASE = dict(kind="image", scan=(100, 100), detector=192, max_angle_rad=7.75e-3 / 2, semiangle_rad=1.2e-3, defocus_m=60e-6)


def _gpu():
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    free, total = cupy.cuda.runtime.memGetInfo()
    return {"gpu": name, "gpu_memory_gib": round(total / 2**30, 1), "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(), "cupy": cupy.__version__}


def _events_median(fn, repeats=7):
    import cupy

    fn()
    cupy.cuda.Device().synchronize()
    ts = []
    for _ in range(repeats):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(a, b) / 1e3)
    return statistics.median(ts)


def fft_us(n, batch, modes=1):
    """Microseconds per complex64 2-D FFT of n x n, batch x modes at once, in place."""
    import cupy

    from daskptycho.physics.cuda import fft_unscaled

    a = (cupy.random.standard_normal((batch, modes, n, n), dtype=cupy.float32) + 0j).astype(cupy.complex64)

    def go():
        fft_unscaled(a, True)

    return _events_median(go) / (batch * modes) * 1e6


def _steady(times, skip=2):
    """Median of the per-iteration times after the first ``skip``."""
    rest = times[skip:] if len(times) > skip + 2 else times[1:]
    return statistics.median(rest)


def _progress_timer():
    stamps = []

    def progress(it, cost):
        stamps.append(time.perf_counter())

    def per_iteration():
        return [b - a for a, b in zip(stamps, stamps[1:])]

    return progress, per_iteration, stamps


def _store(kind, case, tmp):
    import daskptycho as dp

    path = os.path.join(tmp, f"{kind}.zarr")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        dp.write_dataset(dp.simulate(**case), path)
        print(f"  simulated {kind} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def ml_in_process(path, iterations):
    """Seconds per iteration of ml_step on device-resident data (no cluster)."""
    import cupy

    import daskptycho as dp
    from daskptycho.engines import engine_options
    from daskptycho.engines.problem import prepare
    from daskptycho.io.patterns import load_patterns
    from daskptycho.tasks.ml import ml_init, ml_step

    ds = dp.open_dataset(path)
    problem = prepare(ds, engine_options(engine="ml", slices=ML_CASE["slices"], device="gpu", iterations=iterations))
    data = cupy.asarray(load_patterns(ds))
    state = ml_init(problem)
    times = []
    for it in range(iterations):
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        state = ml_step(state, data, it, problem)  # returns after the cost (one synchronisation)
        times.append(time.perf_counter() - t0)
    pool = cupy.get_default_memory_pool().total_bytes()
    return {"iteration_s": _steady(times), "times_s": times, "gpu_pool_bytes": int(pool), "costs_last": state["cost"],
            "positions": problem.n_positions}


def engine_on_cluster(path, workers, iterations, **kw):
    """Seconds per iteration of dp.reconstruct on a LocalCluster of ``workers`` (steady state)."""
    import json

    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    progress, per_it, _ = _progress_timer()
    with local_cluster(workers, memory_limit="24GiB") as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        res = dp.reconstruct(dp.open_dataset(path), iterations=iterations, client=client, device="gpu", progress=progress, **kw)
        wall = time.perf_counter() - t0
    mem = json.loads(res.attrs["memory"])
    times = per_it()
    return {"iteration_s": _steady(times), "times_s": times, "wall_s": wall, "workers": workers,
            "gpu_pool_bytes": mem.get("worker_gpu_pool_bytes"), "cost_first": float(res.cost.values[0]),
            "cost_last": float(res.cost.values[-1]), "options": {k: str(v) for k, v in kw.items()}}


def transfer(sizes_mib=(2, 32), repeats=9):
    """Median seconds to move a CuPy strip between two GPU workers, per protocol."""
    from distributed import Client

    out = {}
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as e:
        return {"error": f"dask-cuda: {e}"}
    protocols = ["tcp"]
    try:
        import distributed_ucxx  # noqa: F401

        protocols.append("ucx")
    except ImportError as e:
        out["ucx_error"] = f"distributed-ucxx not importable: {e}"
    for proto in protocols:
        try:
            kw = dict(protocol=proto) if proto == "tcp" else dict(protocol="ucx", enable_tcp_over_ucx=True, enable_nvlink=True)
            with LocalCUDACluster(CUDA_VISIBLE_DEVICES="0,0", n_workers=2, threads_per_worker=1, **kw) as cl, Client(cl) as c:
                a, b = list(c.scheduler_info()["workers"])[:2]
                rows = {}
                for mib in sizes_mib:
                    n = mib * 2**20 // 8

                    def make(n=n):
                        import cupy
                        return cupy.ones(n, dtype=cupy.complex64)

                    def touch(x):
                        return int(x.shape[0])

                    src = c.submit(make, workers=[a], pure=False)
                    src.result()
                    moves, local = [], []
                    for i in range(repeats):
                        t0 = time.perf_counter()
                        c.submit(touch, src, workers=[a], pure=False).result()
                        local.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        c.submit(touch, src, workers=[b], pure=False, key=f"move-{proto}-{mib}-{i}").result()
                        moves.append(time.perf_counter() - t0)
                        # drop b's copy so the next move transfers again
                        c.run(lambda dask_worker, k=src.key: dask_worker.data.pop(k, None) and None, workers=[b])
                    rows[f"{mib}MiB"] = {"move_s": statistics.median(moves), "same_worker_task_s": statistics.median(local),
                                         "transfer_s": statistics.median(moves) - statistics.median(local)}
                out[proto] = rows
        except Exception as e:  # noqa: BLE001 - recorded, the other cases go on
            out[f"{proto}_error"] = f"{type(e).__name__}: {e}"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks gpu")
    ap.add_argument("--out", default="gpu")
    ap.add_argument("--steps", default="floor,ml,engines,dm,transfer")
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="smaller cases (a smoke run)")
    args = ap.parse_args(argv)
    steps = args.steps.split(",")
    ml_case, dm_case = dict(ML_CASE), dict(DM_CASE)
    dm_iterations = 50
    if args.quick:
        ml_case.update(scan=(16, 16), detector=64, slices=4)
        dm_case.update(scan=(20, 20), detector=64)
        dm_iterations = 10
    tmp = os.environ.get("DASKPTYCHO_BENCH_TMP") or tempfile.mkdtemp(prefix="dp-gpu-bench-")
    result = {"gpu": _gpu(), "cases": {}, "command": "python -m benchmarks gpu " + " ".join(argv or [])}
    cases = result["cases"]

    def save():
        write(args.out, result)

    n, slices = ml_case["detector"], ml_case["slices"]
    positions = ml_case["scan"][0] * ml_case["scan"][1]
    ffts = positions * (4 * slices - 2)
    if "floor" in steps:
        cases["floor"] = {"us_per_fft": {f"{n}px_batch{positions}": fft_us(n, positions),
                                         f"{dm_case['detector']}px_batch4096x4": fft_us(dm_case["detector"], 1024, 4)},
                          "ffts_per_ml_iteration": ffts}
        cases["floor"]["ml_floor_s"] = ffts * cases["floor"]["us_per_fft"][f"{n}px_batch{positions}"] * 1e-6
        print("floor", cases["floor"], flush=True)
        save()
    floor = cases.get("floor", {}).get("ml_floor_s")
    path = _store("pbtio3", ml_case, tmp) if {"ml", "engines"} & set(steps) else None
    if "ml" in steps:
        try:
            inproc = ml_in_process(path, args.iterations)
            cases["ml_in_process"] = inproc
            print("ml in process", inproc["iteration_s"], flush=True)
            save()
            ml = engine_on_cluster(path, 1, args.iterations, engine="ml", slices=slices)
            cases["ml"] = ml
            if floor:
                for c in (inproc, ml):
                    c["fraction_of_fft_floor"] = floor / c["iteration_s"]
            print("ml", ml["iteration_s"], flush=True)
        except Exception as e:  # noqa: BLE001
            cases["ml_error"] = f"{type(e).__name__}: {e}"
        save()
    if "engines" in steps:
        for name, workers, kw in [("gd_2x2_4workers", 4, dict(engine="gd", tiles=(2, 2))),
                                  ("gd_2x2_1worker", 1, dict(engine="gd", tiles=(2, 2))),
                                  ("hve_2x2_4workers", 4, dict(engine="hve", tiles=(2, 2)))]:
            try:
                r = engine_on_cluster(path, workers, args.iterations, slices=slices, **kw)
                if "ml" in cases:
                    r["ratio_to_ml"] = r["iteration_s"] / cases["ml"]["iteration_s"]
                if floor:
                    r["fraction_of_fft_floor"] = floor / r["iteration_s"]
                cases[name] = r
                print(name, r["iteration_s"], flush=True)
            except Exception as e:  # noqa: BLE001
                cases[f"{name}_error"] = f"{type(e).__name__}: {e}"
            save()
    if "dm" in steps:
        try:
            dpath = _store("image", dm_case, tmp)
            r = engine_on_cluster(dpath, 1, dm_iterations, engine="dm", probe_modes=4, partitions=1)
            r["iterations"] = dm_iterations
            r["positions"] = dm_case["scan"][0] * dm_case["scan"][1]
            r["detector"] = dm_case["detector"]
            # the run's iterations end to end (the n - 1 intervals between their costs, scaled to n):
            # the cluster's start, loading the patterns and the first views are not in it
            r["all_iterations_s"] = sum(r["times_s"]) * dm_iterations / max(len(r["times_s"]), 1)
            cases["dm"] = r
            print("dm", r["iteration_s"], r["wall_s"], flush=True)
        except Exception as e:  # noqa: BLE001
            cases["dm_error"] = f"{type(e).__name__}: {e}"
        save()
    if "transfer" in steps:
        cases["transfer"] = transfer()
        print("transfer", cases["transfer"], flush=True)
        save()
    result["machine"] = machine()
    save()
    return result
