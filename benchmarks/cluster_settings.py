"""What the run's settings are worth: the default run with and without each.

    python -m benchmarks cluster_settings [--blocks 2]

The default run's case (:mod:`benchmarks.default_run`: 26 x 26 positions of 96 x 96 px,
``daskptycho.reconstruct`` with its defaults, gd 2 x 2 tiles on a 2-worker LocalCluster
started by :func:`daskptycho.cluster.local_cluster`), run with the library's settings
(``defaults``) and with one of them changed back to what distributed does by itself:

``daskptycho.cluster.pin-workers: false``
    the workers run on any core instead of each on its own share;
``daskptycho.cluster.background: default``
    distributed's own intervals for the system monitor (500 ms), the event-loop check
    (20 ms) and the workers' stack sampler (10 ms) instead of 2 s, 100 ms and 100 ms;
``daskptycho.schedule.block_iterations: 8``
    peer blocks of up to 8 iterations, the earlier default, instead of 16.

Every run on a fresh cluster; each comparison in blocks of four runs in ABBA order
(defaults, changed, changed, defaults; the next block starts with the changed one), so
that drift over the blocks favours neither. Per run, the time per iteration over the
whole run after its first block at the defaults (:func:`benchmarks.default_run.spans`;
with blocks of 8 the same iterations, whose ends are block ends too). Reported: the
medians, and in how many of the pairs (a block's first and last run against its middle
two) the defaults were faster. Writes benchmarks/results/cluster_settings.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from .common import write
from .default_run import DETECTOR, SCAN, spans

#: label, the setting changed back
CHANGES = (
    ("workers on any core", {"daskptycho.cluster.pin-workers": False}),
    ("distributed's background intervals", {"daskptycho.cluster.background": "default"}),
    ("blocks of 8 iterations", {"daskptycho.schedule.block_iterations": 8}),
)


def _run(ds, cfg, span):
    import dask
    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    with dask.config.set({**cfg, "daskptycho.dashboard.live": False}):
        with local_cluster(2) as cluster, Client(cluster) as client:
            stamps = []
            dp.reconstruct(ds, client=client, progress=lambda it, c: stamps.append(time.perf_counter()))
    a, b = span
    return (stamps[b] - stamps[a]) / (b - a)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks cluster_settings")
    ap.add_argument("--blocks", type=int, default=2, help="blocks of four runs (ABBA) per comparison")
    args = ap.parse_args(argv)

    import dask

    import daskptycho as dp
    from daskptycho.engines import engine_options

    load0 = os.getloadavg()
    block = int(dask.config.get("daskptycho.schedule.block_iterations"))
    defaults = engine_options()
    span = spans(defaults.iterations, defaults.minibatch_iterations(), block)["run"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scan.zarr")
        dp.write_dataset(dp.simulate(kind="image", scan=(SCAN, SCAN), detector=DETECTOR), path)
        ds = dp.open_dataset(path)
        for label, change in CHANGES:
            base, changed, pairs = [], [], []
            for k in range(args.blocks):
                order = ("d", "c", "c", "d") if k % 2 == 0 else ("c", "d", "d", "c")
                got = []
                for which in order:
                    s = _run(ds, {} if which == "d" else change, span)
                    got.append((which, s))
                    (base if which == "d" else changed).append(s)
                    print(label, which, round(s * 1e3, 2), flush=True)
                # the block's outer runs against its inner ones
                pairs += [(got[0], got[1]), (got[3], got[2])]
            wins = sum(1 for x, y in pairs if dict([x, y])["d"] < dict([x, y])["c"])
            rows.append({"label": label, "change": {k: str(v) for k, v in change.items()},
                         "defaults_s_per_iteration": statistics.median(base), "changed_s_per_iteration": statistics.median(changed),
                         "speedup": statistics.median(changed) / statistics.median(base),
                         "defaults_faster_pairs": wins, "pairs": len(pairs), "defaults_runs": base, "changed_runs": changed})
    out = write("cluster_settings", {
        "dataset": f"simulate(kind='image', scan=({SCAN}, {SCAN}), detector={DETECTOR}): {SCAN * SCAN} positions, single slice",
        "iterations": defaults.iterations, "span": list(span), "blocks": args.blocks, "rows": rows,
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "command": "python -m benchmarks cluster_settings " + " ".join(argv or []),
    })
    for r in rows:
        print(f"{r['label']:36s} defaults {r['defaults_s_per_iteration'] * 1e3:.2f} ms, changed {r['changed_s_per_iteration'] * 1e3:.2f} ms "
              f"({r['speedup']:.3f}x; defaults faster in {r['defaults_faster_pairs']} of {r['pairs']} pairs)")
    print(out)


if __name__ == "__main__":
    main()
