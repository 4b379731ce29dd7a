"""Pty-Chi's LSQML on one daskptycho store, for the independent quality benchmark.

Runs in benchmarks/peers/.venv (Pty-Chi on CPU torch, daskptycho editable)::

    benchmarks/peers/.venv/bin/python benchmarks/independent/ptychi_run.py STORE OUT.npz \
        [--slices 1] [--modes 1] [--stages 40,50] [--batch-size 100] [--threads 1]

Settings: Pty-Chi's defaults for LSQML, plus what a user sets: the wavelength, pixel size
and slice spacing from the store, object and probe optimisation on, positions fixed,
``--batch-size`` (Pty-Chi's default 100), seed 0. Conventions as in
benchmarks/peers/ptychi_vs_daskptycho.py: intensities times ``N^2`` (Pty-Chi's
unnormalised FFT), ``fft_shift=True`` (the store's patterns are centred), positions as
window corners with the origin at ``(N - 1) / 2``, so Pty-Chi's object lies on
daskptycho's reconstruction grid (2 pixels wider each side, the room Pty-Chi asks for,
cropped off before saving: the default grid); the starting object (ones) and probe (the
nominal aperture probe, ``--modes`` modes made from it) are daskptycho's
``prepare``'s, as a user would start from the same nominal probe.

Writes OUT.npz: ``object_<n>`` (S, H, W) complex64 after ``n`` epochs for each stage, and
``meta`` (JSON: seconds per stage, versions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "peers"))
PAD = 2


def main(argv=None):
    p = argparse.ArgumentParser(prog="ptychi_run")
    p.add_argument("store")
    p.add_argument("out")
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--modes", type=int, default=1)
    p.add_argument("--stages", default="40,50")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    stages = [int(s) for s in a.stages.split(",")]

    import torch
    from ptychi_vs_daskptycho import import_torchvision

    import daskptycho as dp
    from daskptycho.engines import engine_options
    from daskptycho.engines.problem import prepare

    import_torchvision()
    import ptychi
    import ptychi.api as api
    from ptychi.api.task import PtychographyTask

    torch.set_num_threads(a.threads)
    torch.set_default_dtype(torch.float32)
    ds = dp.open_dataset(a.store)
    # PAD pixels more each side than daskptycho's default grid: Pty-Chi wants room around the
    # outermost windows (else it pads by itself); cropped off again below
    problem = prepare(ds, engine_options(dict(engine="ml", slices=a.slices, probe_modes=a.modes, pad_px=PAD)))
    n = problem.window[0]
    inten = ds["intensity"].values.astype(np.float32) * float(problem.window[0] * problem.window[1])
    o = api.LSQMLOptions()
    o.data_options.wavelength_m = float(problem.wavelength_m)
    o.data_options.fft_shift = True
    o.object_options.pixel_size_m = float(problem.grid.pixel_size_m)
    if a.slices > 1:
        o.object_options.slice_spacings_m = np.full(a.slices - 1, float(problem.slice_thickness_m))
    o.object_options.optimizable = True
    o.object_options.determine_position_origin_coords_by = api.enums.ObjectPosOriginCoordsMethods.SPECIFIED
    o.object_options.position_origin_coords = np.array([(n - 1) / 2, (n - 1) / 2])
    o.probe_options.optimizable = True
    o.probe_position_options.optimizable = False
    o.reconstructor_options.batch_size = a.batch_size
    o.reconstructor_options.num_epochs = stages[-1]
    o.reconstructor_options.default_device = api.Devices.CPU
    o.reconstructor_options.random_seed = 0
    obj0 = problem.initial_object(np).astype(np.complex64)
    probe0 = np.asarray(problem.probe, dtype=np.complex64).reshape((1, -1) + tuple(problem.window))
    corners = problem.corners.astype(np.float32)
    task = PtychographyTask(o, diffraction_data=inten, object_data=torch.as_tensor(obj0), probe_data=torch.as_tensor(probe0),
                            probe_position_y_px=corners[:, 0], probe_position_x_px=corners[:, 1])
    out, seconds = {}, {}
    t0 = time.perf_counter()
    done = 0
    for s in stages:
        task.run(s - done)
        done = s
        seconds[str(s)] = time.perf_counter() - t0
        obj = np.asarray(task.get_data_to_cpu("object", as_numpy=True), dtype=np.complex64).reshape((a.slices,) + obj0.shape[-2:])
        out[f"object_{s}"] = obj[:, PAD:-PAD, PAD:-PAD]  # daskptycho's default grid
        print(f"Pty-Chi LSQML {os.path.basename(a.store)} modes={a.modes}: {s} epochs, {seconds[str(s)]:.0f} s", flush=True)
    meta = {"seconds": seconds, "versions": {"torch": torch.__version__, "ptychi": getattr(ptychi, "__version__", "?")},
            "threads": a.threads, "batch_size": a.batch_size, "modes": a.modes, "slices": a.slices}
    np.savez(a.out, meta=np.array(json.dumps(meta)), **out)


if __name__ == "__main__":
    main()
