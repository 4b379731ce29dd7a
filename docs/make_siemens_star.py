"""Reconstruct the real Siemens-star data with the multi-mode difference map and
draw docs/siemens-star.png.

    .venv/bin/python docs/make_siemens_star.py [--iterations 40] [--probe-modes 3] [--workers 2]

Imports data/siemens-star-small.npz.bz2 (Tike test data measured at the APS
Velociprobe; BSD-3-style licence, see LICENSE-tike.txt beside it), reconstructs it
with engine 'dm' on an embedded LocalCluster, prints the Fourier error of every
iteration, and writes the picture (phase, amplitude, probe modes with their power
fractions, Fourier error curve).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from daskptycho.io.atomic import atomic_file

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data", "siemens-star-small.npz.bz2")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--probe-modes", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--probe-refine-start", type=int, default=0, help="first iteration that updates the probe")
    p.add_argument("--data", default=DATA)
    p.add_argument("--out", default=os.path.join(HERE, "siemens-star.png"))
    a = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import daskptycho as dp
    from daskptycho.io.importers import import_siemens_star

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "siemens.zarr")
        dp.write_dataset(import_siemens_star(a.data), store)
        ds = dp.open_dataset(store)

        def show(it, cost):
            print(f"iteration {it + 1:3d}  Fourier error {cost:.6g}", flush=True)

        res = dp.reconstruct(ds, engine="dm", iterations=a.iterations, probe_modes=a.probe_modes,
                             workers=a.workers, probe_refine_start=a.probe_refine_start, progress=show)
        pos = ds.position.values  # read before the temporary store goes away
    err = res.cost.values
    print(f"Fourier error fell from {err[0]:.6g} to {err[-1]:.6g} ({err[-1] / err[0]:.3g} of the first)")
    obj = res.object.values[0]
    dx = res.attrs["pixel_size_m"]
    y0, x0 = res.y.values[0], res.x.values[0]
    r0, c0 = ((pos.min(0) - [y0, x0]) / dx).astype(int)
    r1, c1 = ((pos.max(0) - [y0, x0]) / dx).astype(int)
    crop = (slice(r0, r1), slice(c0, c1))  # the scanned field
    probe = res.probe.values
    frac = res.probe_power_fraction.values
    k = probe.shape[0]
    fig = plt.figure(figsize=(4 * (2 + k) * 0.8 + 1, 7.5), layout="constrained")
    grid = fig.add_gridspec(2, 2 + k)
    ax = fig.add_subplot(grid[:, 0])
    ph = np.angle(obj[crop] * np.exp(-1j * np.angle(np.mean(obj[crop]))))
    ax.imshow(ph, cmap="gray")
    ax.set_title("phase (rad)")
    ax = fig.add_subplot(grid[:, 1])
    ax.imshow(np.abs(obj[crop]), cmap="gray")
    ax.set_title("amplitude")
    for m in range(k):
        ax = fig.add_subplot(grid[0, 2 + m])
        ax.imshow(np.abs(probe[m]), cmap="magma")
        ax.set_title(f"probe mode {m}: {100 * frac[m]:.1f}%")
        ax.set_xticks([])
        ax.set_yticks([])
    ax = fig.add_subplot(grid[1, 2:])
    ax.semilogy(np.arange(1, err.size + 1), err, "o-", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("Fourier error")
    fig.suptitle(f"Siemens star (APS Velociprobe, Tike test data): dm, {k} probe modes, {a.iterations} iterations, "
                 f"{res.attrs['partitions']} parts on {a.workers} workers")
    with atomic_file(a.out, overwrite=True) as tmp:  # a figure is replaced whole or not at all
        fig.savefig(tmp, dpi=90, format="png")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
