"""Pty-Chi's LSQML engine against daskptycho's ``ml`` and ``gd`` on the same simulated data.

    bash benchmarks/peers/setup.sh                      # once: benchmarks/peers/.venv
    benchmarks/peers/.venv/bin/python benchmarks/peers/ptychi_vs_daskptycho.py [--scan 24 --iterations 10]

One dataset per variant, simulated by daskptycho (PbTiO3 along [001], 200 keV electrons,
128 px patterns): ``single`` (1 slice) and ``multislice`` (4 slices). Both codes start from
the same object (ones on the same grid), the same probe (daskptycho's initial probe, kept
fixed by both), the same positions and run the same number of iterations (epochs).

Conventions matched (read from Pty-Chi's source in the peer venv):

* data: Pty-Chi takes intensities centred (it FFT-shifts them itself, ``fft_shift=True``)
  and its far-field propagator is the *unnormalised* FFT, daskptycho's the orthonormal
  one: the intensities given to Pty-Chi are multiplied by ``N_y N_x`` so the same probe
  fits both;
* positions: Pty-Chi cuts the patch whose top-left pixel is ``position + origin -
  (N - 1) / 2``; with the origin given as ``(N - 1) / 2`` the positions are
  daskptycho's window corners (integers: no sub-pixel interpolation);
* slices: Pty-Chi's angular-spectrum kernel (exact, not paraxial) with the same spacing;
  the difference from daskptycho's Fresnel kernel at 25 mrad is a constant phase and a
  correction of order ``(lambda k)^4``.

Timing: median seconds per iteration with the first excluded; Pty-Chi runs one epoch per
``task.run(1)`` call in this process; daskptycho's per-iteration times come from its
progress callback. daskptycho runs full batch (exact gradient descent) and, like Pty-Chi, in
minibatches of ``--batch-size`` positions. Threads: ``torch.set_num_threads(1)`` against ``ml`` (one worker, one
thread) and ``2`` against ``gd`` (2 workers x 1 thread). Error: daskptycho's
:func:`~daskptycho.metrics.phase_correlation` (Pearson r and RMS of the projected phase
after removing the mean offset) over the scanned field, for both codes.

GPU (``--device gpu``): Pty-Chi on CUDA (its ``default_device`` GPU; timings after
``torch.cuda.synchronize()``) against daskptycho's ``ml`` with ``device="gpu"`` (one worker
driving the GPU), on the multislice variant of the GPU target by default (``--scan 48``:
2304 positions, 128 px, ``--slices 8``), full batch and minibatches of ``--batch-size``
for both codes; the same iterations, error measure and medians as on the CPU. A failing
row is recorded (``error``) and the others go on, and the JSON is written after every row
(``"partial": true`` until the end), so a run stopped by its time limit keeps what it had.
It runs under any Python that has torch, Pty-Chi and daskptycho's requirements, e.g. the
device machine's ``python3`` with the wheels of ``.whl/`` (``bash benchmarks/gpu.sh``)::

    PYTHONPATH=/tmp/site:. python3 benchmarks/peers/ptychi_vs_daskptycho.py --device gpu

Writes benchmarks/results/peers.json (``--device cpu``) or peers_gpu.json (``--device gpu``;
``--out`` names another).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: benchmarks.common


def import_torchvision():
    """Import torchvision, also with CPU-only PyTorch.

    The torchvision wheels on PyPI link the CUDA build of PyTorch, so with the CPU build
    their compiled operators (``_C.so``: nms, roi_align, ...) cannot load, and
    ``import torchvision`` fails while registering those operators' fake kernels.
    Pty-Chi uses only torchvision's pure-Python transforms (``GaussianBlur``), so the
    registrations are skipped for the import; no operator of ``_C.so`` is ever called.
    With a CUDA build of PyTorch (the GPU machine's, with its matching torchvision) the
    import is the plain one.
    """
    import torch
    import torch.library

    if torch.version.cuda:  # CUDA PyTorch: the wheel's operators load; nothing to skip
        import torchvision

        return torchvision
    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: (lambda f: f)
    try:
        import torchvision
    finally:
        torch.library.register_fake = register_fake
    return torchvision


def run_ptychi(ds, problem, iterations, threads, batch_size, slices, device="cpu"):
    import torch

    import_torchvision()
    import ptychi.api as api
    from ptychi.api.task import PtychographyTask

    gpu = device == "gpu"
    if gpu and not torch.cuda.is_available():
        raise RuntimeError(f"--device gpu but torch {torch.__version__} sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float32)
    n = problem.window[0]
    inten = ds["intensity"].values.astype(np.float32) * float(problem.window[0] * problem.window[1])
    o = api.LSQMLOptions()
    o.data_options.wavelength_m = float(problem.wavelength_m)
    o.data_options.fft_shift = True
    obj0 = problem.initial_object(np).astype(np.complex64)
    o.object_options.pixel_size_m = float(problem.grid.pixel_size_m)
    if slices > 1:
        o.object_options.slice_spacings_m = np.full(slices - 1, float(problem.slice_thickness_m))
    o.object_options.optimizable = True
    o.object_options.determine_position_origin_coords_by = api.enums.ObjectPosOriginCoordsMethods.SPECIFIED
    o.object_options.position_origin_coords = np.array([(n - 1) / 2, (n - 1) / 2])
    o.probe_options.optimizable = False
    corners = problem.corners.astype(np.float32)
    o.probe_position_options.optimizable = False
    o.reconstructor_options.batch_size = batch_size
    o.reconstructor_options.num_epochs = iterations
    o.reconstructor_options.default_device = api.Devices.GPU if gpu else api.Devices.CPU
    o.reconstructor_options.random_seed = 0
    task = PtychographyTask(o, diffraction_data=inten, object_data=torch.as_tensor(obj0),
                            probe_data=torch.as_tensor(problem.probe[None].astype(np.complex64)),
                            probe_position_y_px=corners[:, 0], probe_position_x_px=corners[:, 1])
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        task.run(1)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    obj = task.get_data_to_cpu("object", as_numpy=True)
    if gpu:
        del task
        torch.cuda.empty_cache()  # leave the GPU's memory to the next run
    return obj, times


def run_daskptycho(store, engine, iterations, slices, workers, tiles=None, batch_size=None, device="cpu"):
    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    stamps = []
    kw = dict(iterations=iterations, slices=slices, batch_size=batch_size)
    if tiles:
        kw["tiles"] = tiles
    if device != "cpu":
        kw["device"] = device
    with local_cluster(workers, memory_limit=0) as cl, Client(cl) as c:
        t0 = time.perf_counter()
        res = dp.reconstruct(store, engine=engine, client=c, progress=lambda it, cost: stamps.append(time.perf_counter()), **kw)
    edges = [t0] + stamps
    return res, [b - a for a, b in zip(edges[:-1], edges[1:])]


def _score(obj_values, template, truth, position):
    from daskptycho.metrics import phase_correlation

    da = template.copy(data=obj_values.astype(np.complex64))
    r, rms = phase_correlation(da, truth, position)
    return float(r), float(rms)


def _object_template(problem, slices):
    """An object DataArray on the reconstruction grid (as daskptycho's result has it), to
    score a Pty-Chi object when no daskptycho result is at hand."""
    import xarray as xr

    g = problem.grid
    return xr.DataArray(np.ones((slices, len(g.y), len(g.x)), np.complex64), dims=("slice", "y", "x"),
                        coords={"y": g.y, "x": g.x, "slice": np.arange(slices)})


def _ptychi_version(final):
    """Pty-Chi's version once it is imported (run_ptychi imports it; the final save imports
    it if no row did, recording why it could not)."""
    mod = sys.modules.get("ptychi")
    if mod is None and final:
        try:
            import_torchvision()
            import ptychi as mod
        except Exception as e:  # noqa: BLE001 - recorded
            return f"not importable ({type(e).__name__}: {e})"
    return getattr(mod, "__version__", "2.2.0") if mod is not None else "2.2.0 (not imported yet)"


def _gpu_info():
    import torch

    info = {"torch_cuda": torch.version.cuda}
    try:
        info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001 - recorded
        info["gpu"] = f"none ({type(e).__name__}: {e})"
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except Exception as e:  # noqa: BLE001 - recorded
        info["cupy"] = f"none ({type(e).__name__}: {e})"
    return info


def main(argv=None):
    p = argparse.ArgumentParser(prog="ptychi_vs_daskptycho")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: both codes on the CPU (threads 1 and 2); gpu: Pty-Chi on CUDA, daskptycho ml with device='gpu'")
    p.add_argument("--scan", type=int, default=None, help="scan side: positions = scan^2 (default 24 on cpu, 48 on gpu)")
    p.add_argument("--detector", type=int, default=128)
    p.add_argument("--slices", type=int, default=None, help="slices of the multislice variant (default 4 on cpu, 8 on gpu)")
    p.add_argument("--variants", default=None, help="comma-separated of single,multislice (default both on cpu, multislice on gpu)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=96, help="Pty-Chi LSQML minibatch (its default is 100)")
    p.add_argument("--out", default=None, help="results name: benchmarks/results/<out>.json (default peers on cpu, peers_gpu on gpu)")
    a = p.parse_args(argv)
    gpu = a.device == "gpu"
    if a.scan is None:
        a.scan = 48 if gpu else 24
    if a.slices is None:
        a.slices = 8 if gpu else 4
    variants = (a.variants or ("multislice" if gpu else "single,multislice")).split(",")
    unknown = set(variants) - {"single", "multislice"}
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; use single and/or multislice")
    out = a.out or ("peers_gpu" if gpu else "peers")
    if out.endswith(".json"):
        out = out[:-len(".json")]

    import tempfile

    import torch

    import daskptycho as dp
    from benchmarks.common import write
    from daskptycho.engines import engine_options
    from daskptycho.engines.problem import prepare

    load0 = os.getloadavg()
    rows = []
    header = {
        "dataset": f"pbtio3 {a.scan}x{a.scan} positions, {a.detector} px patterns; single slice and {a.slices} slices",
        "iterations": a.iterations,
    }
    if gpu:
        slices_text = " and ".join("single slice" if v == "single" else f"{a.slices} slices" for v in variants)
        header["dataset"] = f"pbtio3 {a.scan}x{a.scan} positions, {a.detector} px patterns; {slices_text}"
        header["device"] = "gpu"
        header["gpu"] = _gpu_info()
    command = ("benchmarks/peers/.venv/bin/python benchmarks/peers/ptychi_vs_daskptycho.py " if not gpu
               else "PYTHONPATH=/tmp/site:. python3 benchmarks/peers/ptychi_vs_daskptycho.py ") + " ".join(argv or sys.argv[1:])

    def save(partial):
        versions = {"peer_versions": {"torch": torch.__version__, "ptychi": _ptychi_version(final=not partial)}}
        payload = {"loadavg_start": load0, "loadavg_end": os.getloadavg(), **header, **versions, "rows": rows, "command": command}
        if partial:
            payload["partial"] = True
        return write(out, payload)

    with tempfile.TemporaryDirectory() as tmp:
        for variant, slices in (("single", 1), ("multislice", a.slices)):
            if variant not in variants:
                continue
            t0 = time.perf_counter()
            ds = dp.simulate(kind="pbtio3", scan=(a.scan, a.scan), detector=a.detector, slices=slices)
            store = os.path.join(tmp, f"{variant}.zarr")
            dp.write_dataset(ds, store)
            ds = dp.open_dataset(store)
            print(f"{variant}: simulated {a.scan}x{a.scan} x {a.detector} px, {slices} slice(s) in {time.perf_counter() - t0:.1f} s", flush=True)
            problem = prepare(ds, engine_options(dict(engine="ml", slices=slices, iterations=a.iterations)))
            truth = ds["truth_object"]
            position = ds["position"].values
            if gpu:
                _gpu_variant(a, variant, slices, ds, store, problem, truth, position, rows, save)
                continue
            ours = {}
            for label, engine, workers, tiles, batch in (("daskptycho ml (full batch)", "ml", 1, None, None),
                                                         (f"daskptycho ml (minibatch {a.batch_size})", "ml", 1, None, a.batch_size),
                                                         ("daskptycho gd 2x2 (full batch)", "gd", 2, (2, 2), None)):
                res, times = run_daskptycho(store, engine, a.iterations, slices, workers, tiles, batch)
                r, rms = _score(res["object"].values, res["object"], truth, position)
                ours.setdefault(engine, res)
                rows.append({"variant": variant, "slices": slices, "code": label, "threads": workers,
                             "iteration_s": times, "iteration_s_median": statistics.median(times[1:]),
                             "phase_r": r, "phase_rms_rad": rms})
                print(rows[-1]["code"], variant, f"{rows[-1]['iteration_s_median']:.3f} s/it r={r:.4f} rms={rms:.4f}", flush=True)
            for threads in (1, 2):
                obj, times = run_ptychi(ds, problem, a.iterations, threads, a.batch_size, slices)
                r, rms = _score(obj, ours["ml"]["object"], truth, position)
                rows.append({"variant": variant, "slices": slices, "code": "Pty-Chi LSQML", "threads": threads,
                             "batch_size": a.batch_size, "iteration_s": times,
                             "iteration_s_median": statistics.median(times[1:]), "phase_r": r, "phase_rms_rad": rms})
                print(f"Pty-Chi LSQML {variant} threads={threads}: {rows[-1]['iteration_s_median']:.3f} s/it r={r:.4f} rms={rms:.4f}", flush=True)
    path = save(partial=False)
    print(f"wrote {path}")


def _gpu_variant(a, variant, slices, ds, store, problem, truth, position, rows, save):
    """The GPU rows of one variant: Pty-Chi first (it does not depend on daskptycho's GPU
    path), then daskptycho; each row recorded on failure too."""
    import traceback

    import torch

    n = len(position)
    template = _object_template(problem, slices)
    # (code, row label, minibatch size; None = full batch); Pty-Chi's LSQML full batch is
    # one minibatch of all positions
    cases = (("ptychi", "Pty-Chi LSQML", a.batch_size),
             ("ptychi", "Pty-Chi LSQML (full batch)", n),
             ("daskptycho", "daskptycho ml (full batch)", None),
             ("daskptycho", f"daskptycho ml (minibatch {a.batch_size})", a.batch_size))
    for code, label, batch in cases:
        row = {"variant": variant, "slices": slices, "code": label, "device": "gpu",
               "threads": torch.get_num_threads() if code == "ptychi" else 1}
        if code == "ptychi":
            row["batch_size"] = batch
        try:
            if code == "ptychi":
                obj, times = run_ptychi(ds, problem, a.iterations, None, batch, slices, device="gpu")
            else:
                res, times = run_daskptycho(store, "ml", a.iterations, slices, 1, None, batch, device="gpu")
                obj = res["object"].values
            r, rms = _score(obj, template, truth, position)
            row.update({"iteration_s": times, "iteration_s_median": statistics.median(times[1:]) if len(times) > 1 else times[0],
                        "phase_r": r, "phase_rms_rad": rms})
            print(f"{label} {variant} gpu: {row['iteration_s_median']:.4f} s/it r={r:.4f} rms={rms:.4f}", flush=True)
        except Exception as e:  # noqa: BLE001 - recorded, the other rows go on
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"{label} {variant} gpu FAILED: {row['error']}", flush=True)
            traceback.print_exc()
        rows.append(row)
        save(partial=True)


if __name__ == "__main__":
    main()
