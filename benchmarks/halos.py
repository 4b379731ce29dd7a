"""Probe-support halos against whole-window halos: what narrower tiles cost in accuracy.

    python -m benchmarks halos [--iterations 50]

gd 2 x 2 on two cases, each run with ``halo="window"`` (every probe window whole: exact
full-batch gradient descent) and with ``halo="probe"`` at several ``halo_fraction`` values:

``thick``
    PbTiO3, 8 slices (3.9 A each), 200 keV, 64 px patterns, 14 x 14 positions: the wave
    spreads through the slab, so the halo is the probe's support plus the spread.
``xray``
    The X-ray test image, far field (one slice), 64 px patterns, 14 x 14 positions.

For each: the halo (px), the largest extended tile (px), the bytes a tile's state holds,
and the relative difference of the reconstructed phase (over the field the run's tiles hold: the
positions' centres grown by the halo) from
the whole-window run after ``--iterations``. Writes benchmarks/results/halos.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from .common import write

CASES = {
    "thick": dict(sim=dict(kind="pbtio3", scan=(14, 14), detector=64, slices=8, max_angle_rad=60e-3, defocus_m=30e-10),
                  slices=8),
    "xray": dict(sim=dict(kind="image", scan=(14, 14), detector=64, max_angle_rad=7.75e-3, semiangle_rad=2.5e-3, defocus_m=20e-6),
                 slices=1),
}
FRACTIONS = (0.9999, 0.999, 0.99, 0.9)


def _held(res):
    """The region the run's tiles hold (the union of their cores): with probe-support halos the
    field within one halo of the positions' centres; the grid's border beyond keeps the
    starting object."""
    cores = json.loads(res.attrs["tile_cores"]).values()
    return (min(c[0] for c in cores), max(c[1] for c in cores), min(c[2] for c in cores), max(c[3] for c in cores))


def _field(res, region):
    """The projected phase over ``region`` (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = region
    return np.angle(np.prod(res.object.values, axis=0))[y0:y1, x0:x1]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks halos")
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--out", default="halos")
    args = ap.parse_args(argv)

    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    rows = []
    with tempfile.TemporaryDirectory() as tmp, local_cluster(2) as cluster, Client(cluster) as client:
        for name, case in CASES.items():
            path = os.path.join(tmp, f"{name}.zarr")
            dp.write_dataset(dp.simulate(**case["sim"]), path)
            ds = dp.open_dataset(path)
            runs = {}
            for halo, fraction in [("window", 1.0)] + [("probe", f) for f in FRACTIONS]:
                res = dp.reconstruct(ds, engine="gd", tiles=(2, 2), iterations=args.iterations, slices=case["slices"],
                                     halo=halo, halo_fraction=fraction, client=client)
                runs[(halo, fraction)] = res
                ext = json.loads(res.attrs["tile_extended"])
                side = max(max(e[1] - e[0], e[3] - e[2]) for e in ext.values())
                mem = json.loads(res.attrs["memory"])
                region = _held(res)
                ref = _field(runs[("window", 1.0)], region)
                got = _field(res, region)
                rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                row = {"case": name, "halo": halo, "halo_fraction": fraction if halo == "probe" else None,
                       "halo_px": json.loads(res.attrs["halo_px"]) if isinstance(res.attrs["halo_px"], str) else list(res.attrs["halo_px"]),
                       "largest_extended_px": side, "tile_object_bytes_max": max(v["object"] for v in mem["tile_bytes"].values()),
                       "phase_rel_diff_vs_window": rel, "final_cost": float(res.cost.values[-1]),
                       "window_px": int(case["sim"]["detector"]), "slices": case["slices"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    path = write(args.out, {"iterations": args.iterations, "rows": rows, "command": "python -m benchmarks halos " + " ".join(argv or [])})
    print(path)
