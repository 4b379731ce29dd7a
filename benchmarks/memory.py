"""Peak memory per tile: ml (one tile) against gd and hve at 4, 9 and 16 tiles.

    python -m benchmarks memory [--scan 64 --detector 128 --slices 8 --iterations 1]

One tile per worker, a fresh LocalCluster per run (so each worker's high-water mark
belongs to that run alone). For each tile: the bytes of state it holds (object
patch, gradient buffer, its diffraction patterns; read from the arrays on the
worker) and the worker's measured peak resident memory above its baseline (after
imports, before data): state plus the largest transient working set of its tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from .common import write


def _run(ds, engine, tiles, iterations, slices):
    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    n = tiles[0] * tiles[1]
    with local_cluster(n, memory_limit=0) as cl, Client(cl) as c:
        res = dp.reconstruct(ds, engine=engine, tiles=tiles, iterations=iterations, slices=slices, client=c)
    mem = json.loads(res.attrs["memory"])
    state = [sum(v.values()) for v in mem["tile_bytes"].values()]
    peak = list(mem["worker_peak_above_baseline_bytes"].values())
    patterns = [v["patterns"] for v in mem["tile_bytes"].values()]
    return {
        "engine": engine, "tiles": n, "workers": n,
        "state_bytes_max": int(max(state)), "patterns_bytes_max": int(max(patterns)),
        "peak_above_baseline_bytes_max": int(max(peak)), "peak_above_baseline_bytes_median": int(np.median(peak)),
        "wall_time_s": float(res.attrs["wall_time_s"]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks memory")
    p.add_argument("--scan", type=int, default=64)
    p.add_argument("--detector", type=int, default=128)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--tiles", default="2,3,4", help="tile grid sides to run (default 2,3,4: 4, 9, 16 tiles)")
    a = p.parse_args(argv)

    import daskptycho as dp

    sides = [int(v) for v in a.tiles.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "pbtio3.zarr")
        dp.write_dataset(dp.simulate(kind="pbtio3", scan=(a.scan, a.scan), detector=a.detector, slices=a.slices), store)
        ds = dp.open_dataset(store)
        rows = [_run(ds, "ml", (1, 1), a.iterations, a.slices)]
        print(rows[-1], flush=True)
        for side in sides:
            for engine in ("gd", "hve"):
                rows.append(_run(ds, engine, (side, side), a.iterations, a.slices))
                print(rows[-1], flush=True)
    ml = rows[0]["peak_above_baseline_bytes_max"]
    for r in rows:
        r["peak_fraction_of_ml"] = r["peak_above_baseline_bytes_max"] / ml
    path = write("memory", {"dataset": f"pbtio3 {a.scan}x{a.scan} positions, {a.detector} px patterns, {a.slices} slices",
                            "iterations": a.iterations, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
