"""Reconstruct the real near-field PETRA III P25 data and draw docs/images/near-field.png.

    .venv/bin/python docs/make_near_field.py [--engine ml] [--iterations 200] [--workers 2]

Imports data/PETRAIII_P25_Near_Field_Ptycho.cxi (the example data of CDTools, measured
at beamline P25 of PETRA III, DESY; CC BY 4.0, see LICENSE-cdtools-example-data.txt
beside it) as a cone beam with the focus 3.65 mm upstream of the sample (the file does
not record it), reconstructs it full batch with the near-field model (Fresnel propagation to
the detector, probe refined from the back-propagated mean amplitude), prints the cost of
every iteration, and writes the picture: phase and amplitude of the scanned field, the
refined probe, the cost curve.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from daskptycho.io.atomic import atomic_file

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("DASKPTYCHO_PETRA_CXI", os.path.join(HERE, "..", "data", "PETRAIII_P25_Near_Field_Ptycho.cxi"))
SOURCE_DISTANCE_M = 3.65e-3  # focus-sample distance of the P25 setup, from CDTools' example script


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--engine", default="ml", choices=["ml", "gd"])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--tiles", default="2x2", help="gd: tiles, rows x columns")
    p.add_argument("--data", default=DATA)
    p.add_argument("--out", default=os.path.join(HERE, "images", "near-field.png"))
    a = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import daskptycho as dp
    from daskptycho.io.cxi import read_cxi

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "near-field.zarr")
        dp.write_dataset(read_cxi(a.data, source_distance_m=SOURCE_DISTANCE_M), store)
        ds = dp.open_dataset(store)
        at = ds.attrs
        print(f"near field: pixel {at['pixel_size_m']:.4g} m (detector pixel / M, M = {at['magnification']:.4g}), effective "
              f"distance {at['effective_distance_m']:.4g} m, pixel Fresnel number {at['fresnel_number_pixel']:.3g}", flush=True)

        def show(it, cost):
            print(f"iteration {it + 1:4d}  cost {cost:.6g}", flush=True)

        kw = dict(tiles=tuple(int(v) for v in a.tiles.split("x")), local_updates=False) if a.engine == "gd" else {}
        t0 = time.perf_counter()
        res = dp.reconstruct(ds, engine=a.engine, iterations=a.iterations, workers=a.workers, progress=show, batch_size=None,
                             **kw)
        wall = time.perf_counter() - t0
        pos = ds.position.values
    cost = res.cost.values
    print(f"{a.engine}, {a.iterations} iterations in {wall:.1f} s: cost fell from {cost[0]:.6g} to {cost[-1]:.6g} "
          f"({cost[-1] / cost[0]:.3g} of the first)")
    obj = res.object.values[0]
    dx = res.attrs["pixel_size_m"]
    y0, x0 = res.y.values[0], res.x.values[0]
    n = res.probe.shape[-1]
    r0, c0 = np.maximum(((pos.min(0) - [y0, x0]) / dx).astype(int) - n // 4, 0)
    r1, c1 = ((pos.max(0) - [y0, x0]) / dx).astype(int) + n // 4
    crop = (slice(r0, r1), slice(c0, c1))  # the scanned field and a quarter window around it
    o = obj[crop] * np.exp(-1j * np.angle(np.mean(obj[crop])))
    probe = res.probe.values[0]
    um = dx * 1e6
    ext = [0, o.shape[1] * um, o.shape[0] * um, 0]
    fig = plt.figure(figsize=(13, 7.5), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    ax = fig.add_subplot(grid[:, 0])
    im = ax.imshow(np.angle(o), cmap="gray", extent=ext)
    ax.set_title("object phase (rad)")
    ax.set_xlabel("x (um)")
    ax.set_ylabel("y (um)")
    fig.colorbar(im, ax=ax, shrink=0.6)
    ax = fig.add_subplot(grid[:, 1])
    im = ax.imshow(np.abs(o), cmap="gray", extent=ext)
    ax.set_title("object amplitude")
    ax.set_xlabel("x (um)")
    fig.colorbar(im, ax=ax, shrink=0.6)
    ax = fig.add_subplot(grid[0, 2])
    ax.imshow(np.abs(probe), cmap="magma", extent=[0, n * um, n * um, 0])
    ax.set_title("refined probe amplitude (sample plane)")
    ax = fig.add_subplot(grid[1, 2])
    ax.semilogy(np.arange(1, cost.size + 1), cost)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"{res.cost.attrs.get('long_name', 'cost').split(' cost')[0]} cost (counts)")
    fig.suptitle(f"PETRA III P25 near-field ptychography (CDTools example data, CC BY 4.0): engine {a.engine}, "
                 f"{a.iterations} iterations, {wall:.0f} s")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with atomic_file(a.out, overwrite=True) as tmp:  # a figure is replaced whole or not at all
        fig.savefig(tmp, dpi=80, format="png")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
