"""dm on simulated fly-scan data: 1 against 4 probe modes, same iterations.

    python -m benchmarks flyscan_modes [--iterations 20] [--view-update raar|dm]

A 16x16 X-ray fly scan (64 px patterns, motion over one 10 px step per exposure,
5 sub-positions, Poisson noise at the default dose), 2 parts on a 2-worker
LocalCluster. Reports the mean error against the truth over the scanned field
(``daskptycho.metrics.error_map``, after the best constant phase), the phase
correlation, the final Fourier error and the probe power fractions. ``--view-update``:
dm's view update (default: the engine's, ``raar``); ``benchmarks/dm_drift.py`` follows
both over 100 iterations.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from .common import write


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks flyscan_modes")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--view-update", choices=["raar", "dm"], default=None, help="dm's view update (default: the engine's)")
    a = p.parse_args(argv)

    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster
    from daskptycho.engines import engine_options
    from daskptycho.metrics import error_map, phase_correlation

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "fly.zarr")
        dp.write_dataset(dp.simulate(kind="flyscan", scan=(16, 16), detector=64), store)
        ds = dp.open_dataset(store)
        pad = int(ds.attrs["recommended_pad_px"])
        # the true modal content of the blur, for comparison
        from daskptycho.physics.probe import orthogonalize_modes

        probe = ds.truth_probe.values[0]
        shifted = np.stack([np.roll(probe, o, axis=1) for o in ds.attrs["flyscan_offsets_px"]])
        true_fractions = orthogonalize_modes(shifted)[1]
        rows = []
        view_update = a.view_update or engine_options(engine="dm").view_update
        with local_cluster(2) as cl, Client(cl) as c:
            for m in (1, 4):
                res = dp.reconstruct(ds, engine="dm", iterations=a.iterations, probe_modes=m, view_update=view_update, pad_px=pad,
                                     partitions=2, client=c)
                r, _ = phase_correlation(res.object, ds.truth_object, ds.position.values)
                rows.append({"probe_modes": m, "error_vs_truth": float(error_map(res.object, ds.truth_object, ds.position.values).mean()),
                             "phase_pearson_r": r, "fourier_error_first": float(res.cost.values[0]),
                             "fourier_error_final": float(res.cost.values[-1]),
                             "power_fractions": res.probe_power_fraction.values.tolist()})
                print(rows[-1], flush=True)
    path = write("flyscan_modes", {"dataset": "flyscan 16x16, 64 px, 5 sub-positions over a 10 px step, default dose",
                                   "iterations": a.iterations, "view_update": view_update, "true_mode_fractions": true_fractions.tolist(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
