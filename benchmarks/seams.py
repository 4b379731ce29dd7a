"""Seams at tile borders: error within 2 px of internal tile borders / error elsewhere.

    python -m benchmarks seams [--iterations 15]

A noisy simulated PbTiO3 dataset (24x24 positions, 64 px patterns, 2 slices, dose
2e5 e/A^2) reconstructed with 3x3 tiles on a 2-worker LocalCluster by ``gd`` (batch
mode, the default; and with the paper's local updates) and ``hve`` (full batch; and
with independent minibatch updates inside each tile).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from .common import write

CASES = [
    ("gd", "batch (default)", {}),
    ("gd", "local updates (Alg. 1), batch 16, step 0.5", dict(local_updates=True, batch_size=16, step=0.5)),
    ("hve", "full batch, exchange every iteration", {}),
    ("hve", "minibatch 16 inside tiles, step 0.5", dict(batch_size=16, step=0.5)),
]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks seams")
    p.add_argument("--iterations", type=int, default=15)
    a = p.parse_args(argv)

    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster
    from daskptycho.metrics import phase_correlation, seam_ratio

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "pbtio3.zarr")
        dp.write_dataset(dp.simulate(kind="pbtio3", scan=(24, 24), detector=64, slices=2, dose=2e5, seed=1), store)
        ds = dp.open_dataset(store)
        rows = []
        with local_cluster(2) as cl, Client(cl) as c:
            for engine, label, kw in CASES:
                res = dp.reconstruct(ds, engine=engine, tiles=(3, 3), iterations=a.iterations, slices=2, client=c, **kw)
                r, rms = phase_correlation(res.object, ds.truth_object, ds.position.values)
                rows.append({"engine": engine, "mode": label, "options": kw,
                             "seam_ratio": seam_ratio(res, ds.truth_object, ds.position.values),
                             "phase_pearson_r": r, "phase_rms_rad": rms})
                print(f"{engine:4s} {label:45s} seam ratio {rows[-1]['seam_ratio']:.3f}  r {r:.4f}")
    path = write("seams", {"dataset": "pbtio3 24x24 positions, 64 px, 2 slices, dose 2e5", "tiles": "3x3",
                           "workers": 2, "iterations": a.iterations, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
