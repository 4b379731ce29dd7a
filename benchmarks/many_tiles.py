"""The scheduler's share, measured: gd with many small tiles on 2 workers, as a tile graph and fused.

    python -m benchmarks many_tiles [--tiles 32 --iterations 6]

gd on a tiny X-ray scan (``--scan`` x ``--scan`` positions of 16 px patterns, one slice)
cut into ``--tiles`` x ``--tiles`` tiles over a 2-worker LocalCluster: the compute per
tile is negligible, so an iteration's time is what the one scheduler (and the client
building and submitting the graph) needs for its tasks. Two runs, side by side:

``tile graph``
    ``daskptycho.schedule.fuse: never``: a task per tile and exchange (grad, tile-cost,
    four strips, update per tile, the probe sums).
``fused``
    ``always``: one task per worker and stage plus one per message between workers
    (:mod:`daskptycho.schedule.fuse`).
``peer exchange``
    ``daskptycho.schedule.exchange: peer`` (the default): blocks of
    ``daskptycho.schedule.block_iterations`` iterations, one stage per worker and block,
    strips sent worker to worker (:mod:`daskptycho.tasks.peer`); three blocks, the time per
    iteration over the last two (a block's costs arrive together).

For each: tasks per iteration (counted from the graph the run submits), steady-state
seconds per iteration (median after the first two), and seconds per task. Also the
scheduling model's prediction for the tile graph, ``tasks x per_task_s`` with
``per_task_s`` measured on independent trivial tasks (:func:`benchmarks.scaling.measure_hop`),
to check the model's scheduler term. Writes benchmarks/results/many_tiles.json.

Every run takes the update rule the scaling model predicts the papers' runs with
(:data:`UPDATE`: one pass round per iteration, the probe held fixed, as the papers' gd),
not the library's default of 4 minibatch rounds per iteration (docs/convergence.md),
which makes 4x the tasks per iteration: the counted graph and the timed run must be the
same graph for the seconds per task to mean anything.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from .common import write

#: the update rule of every run and count here: full batch (one pass round per iteration), probe fixed
UPDATE = dict(batch_size=None, refine_probe=False)


def _count_tasks(ds, tiles, mode, slices=1, block=1):
    """Tasks one iteration submits (the graph, fused or not; ``mode="peer"``: a block of
    ``block`` iterations with peer exchange, divided by ``block``), counted without a cluster."""
    import dask

    from daskptycho.engines import engine_options
    from daskptycho.engines.gd import context_for, fuse_for, tiling_for
    from daskptycho.engines.problem import prepare
    from daskptycho.schedule.fuse import fuse_by_worker
    from daskptycho.schedule.passes import gd_iteration

    p = prepare(ds, engine_options(engine="gd", tiles=(tiles, tiles), slices=slices, **UPDATE))
    tiling = tiling_for(p)
    keys = [t.key for t in tiling]
    place = {k: f"w{i * 2 // len(keys)}" for i, k in enumerate(keys)}
    ctx = context_for(p, tiling)
    if mode == "peer":
        return len(_peer_block(tiling, ctx, place, block)[0].tasks) / block

    g = gd_iteration(tiling, 0, {k: None for k in keys}, {k: None for k in keys}, None, ctx, tag="t")
    wanted = [*g.outputs["states"].values(), *g.outputs["costs"]]
    with dask.config.set({"daskptycho.schedule.fuse": mode}):
        if not fuse_for(place):
            return len(g.tasks)
    fused, _ = fuse_by_worker(g, 0, place, wanted, external=lambda x: False)
    return len(fused.tasks)


def client_block_s(ds, tiles, block, tiles_per_worker=None, repeats=3):
    """The client's seconds for the blocks of a peer run of ``block`` gd iterations on
    ``tiles`` x ``tiles`` tiles (graph builders, fuse and serialisation in this process,
    no cluster), as ``TiledRun`` makes them:

    ``first_s``
        the first block of a shape: build the tile graph, fuse it, serialise the stages'
        bodies (sent once, :func:`~daskptycho.schedule.fuse.stage_bodies`);
    ``later_s``
        every later block: :func:`~daskptycho.schedule.fuse.rebind` and serialise the
        rebound graph (the stages' inputs and channel, the reductions).

    Over 2 workers, or ``tiles_per_worker`` tiles on each worker; medians of ``repeats``."""
    import cloudpickle

    from daskptycho.engines import engine_options
    from daskptycho.engines.gd import context_for, tiling_for
    from daskptycho.engines.problem import prepare
    from daskptycho.schedule.fuse import Ref, rebind, stage_bodies

    p = prepare(ds, engine_options(engine="gd", tiles=(tiles, tiles), slices=1, **UPDATE))
    tiling = tiling_for(p)
    keys = [t.key for t in tiling]
    per = tiles_per_worker or -(-len(keys) // 2)
    place = {k: f"w{i // per}" for i, k in enumerate(keys)}
    ctx = context_for(p, tiling)
    first, later = [], []
    for rep in range(repeats):
        t0 = time.perf_counter()
        fused, where = _peer_block(tiling, ctx, place, block)
        bodies = stage_bodies(fused)
        cloudpickle.dumps(bodies.tasks)
        t1 = time.perf_counter()
        held = {("stage", *k[1:]): f"body-{i}" for i, k in enumerate(bodies.tasks)}
        inputs = {("state", k): Ref(("stage", block - 1, 0, place[k], "t"), ("update", block - 1, *k, "t"), k) for k in keys}
        # the futures the engine passes (patterns, context, probe), here as stand-in keys
        inputs.update({("data", k): ("data-future", *k) for k in keys}, probe=("probe-future",), ctx=("ctx-future",))
        bound, _ = rebind(fused, where, block * (rep + 1), inputs, f"t|{block * (rep + 1)}", bodies=held)
        cloudpickle.dumps(bound.tasks)
        t2 = time.perf_counter()
        first.append(t1 - t0)
        later.append(t2 - t1)
    return {"first_s": statistics.median(first), "later_s": statistics.median(later)}


def _peer_block(tiling, ctx, place, block):
    """A peer run's fused graph of ``block`` gd iterations and where its results are (as
    ``TiledRun`` builds it: the tiles' states and the probe are block inputs)."""
    from daskptycho.schedule.fuse import Input, fuse_by_worker
    from daskptycho.schedule.graph import IterationGraph
    from daskptycho.schedule.passes import gd_iteration

    keys = [t.key for t in tiling]
    g, states, costs = IterationGraph(tag="t"), {k: Input(("state", k)) for k in keys}, []
    data = {k: Input(("data", k)) for k in keys}
    for i in range(block):
        gi = gd_iteration(tiling, i, states, data, Input("probe"), Input("ctx"), tag="t")
        g.tasks.update(gi.tasks)
        g.placement.update(gi.placement)
        states, costs = gi.outputs["states"], costs + gi.outputs["costs"]
    return fuse_by_worker(g, 0, place, [*states.values(), *costs], external=lambda x: isinstance(x, Input), channel="t|0")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks many_tiles")
    ap.add_argument("--tiles", default="32,20", help="tiles per side, one run each (default 32,20: 1024 and 400 tiles); "
                    "the first calibrates the seconds per task, the others check the prediction")
    ap.add_argument("--scan", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--out", default="many_tiles")
    args = ap.parse_args(argv)

    import dask
    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    from .scaling import measure_hop

    hop = measure_hop()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scan.zarr")
        dp.write_dataset(dp.simulate(kind="image", scan=(args.scan, args.scan), detector=16, max_angle_rad=7.75e-3,
                                     semiangle_rad=2.5e-3, defocus_m=5e-6), path)
        ds = dp.open_dataset(path)
        sizes = [int(v) for v in str(args.tiles).split(",")]
        with local_cluster(2) as cluster, Client(cluster) as client:
            for tiles in sizes:
                for mode, label in (("never", "tile graph"), ("always", "fused"), ("peer", "peer exchange")):
                    block = int(dask.config.get("daskptycho.schedule.block_iterations", 8))
                    tasks = _count_tasks(ds, tiles, mode, block=block)
                    stamps = []
                    cfg = {"daskptycho.schedule.exchange": "peer"} if mode == "peer" else \
                        {"daskptycho.schedule.fuse": mode, "daskptycho.schedule.exchange": "scheduler"}
                    with dask.config.set({**cfg, "daskptycho.dashboard.live": False}):
                        t0 = time.perf_counter()
                        # peer: three blocks, the first left out (a block's costs arrive together)
                        n_it = 3 * block if mode == "peer" else args.iterations
                        dp.reconstruct(ds, engine="gd", tiles=(tiles, tiles), iterations=n_it, client=client, **UPDATE,
                                       progress=lambda it, cost, stamps=stamps: stamps.append(time.perf_counter()))
                        wall = time.perf_counter() - t0
                    per_it = [b - a for a, b in zip(stamps, stamps[1:])][1:]
                    if mode == "peer":
                        it_s = (stamps[-1] - stamps[block - 1]) / (len(stamps) - block)
                    else:
                        it_s = statistics.median(per_it) if per_it else None
                    row = {"schedule": label, "tiles": tiles ** 2, "workers": 2, "tasks_per_iteration": tasks,
                           "iteration_s": it_s, "seconds_per_task": it_s / tasks if it_s else None, "wall_s": wall,
                           "intervals_s": per_it}
                    if mode == "peer":
                        # the client's share: the first block of a shape is built and fused, later
                        # ones rebound; here (2 workers) and with a tile per worker (Summit's layout)
                        for layout, per in (("", None), ("_one_tile_per_worker", 1)):
                            cb = client_block_s(ds, tiles, block, tiles_per_worker=per)
                            row[f"client_first_block_s_per_tile_iteration{layout}"] = cb["first_s"] / block / tiles ** 2
                            row[f"client_block_s_per_tile_iteration{layout}"] = cb["later_s"] / block / tiles ** 2
                    if mode == "never":
                        row["model_scheduler_s"] = tasks * hop["per_task_s"]
                        row["model_over_measured"] = row["model_scheduler_s"] / it_s if it_s else None
                    rows.append(row)
                    print({k: v for k, v in row.items() if k != "intervals_s"}, flush=True)
    # the scheduler's seconds per task of a real iteration graph, from the first size's tile graph;
    # the other sizes check the prediction tasks x that figure
    graphs = [r for r in rows if r["schedule"] == "tile graph" and r["iteration_s"]]
    calibration = None
    if graphs:
        per_task = graphs[0]["iteration_s"] / graphs[0]["tasks_per_iteration"]
        calibration = {"per_task_s": per_task, "from_tiles": graphs[0]["tiles"],
                       "checks": [{"tiles": r["tiles"], "predicted_s": r["tasks_per_iteration"] * per_task, "measured_s": r["iteration_s"],
                                   "predicted_over_measured": r["tasks_per_iteration"] * per_task / r["iteration_s"]} for r in graphs[1:]]}
        print("calibration", calibration, flush=True)
    peer_rows = [r for r in rows if r["schedule"] == "peer exchange"]
    if calibration is not None and peer_rows:
        # the client's work per later block (rebinding the first block's graph), a serial floor
        # per iteration, and per first block of a shape (building and fusing every tile's
        # tasks), once per run and shape; with one tile per worker as on the modelled machine
        r0 = peer_rows[0]
        calibration["client_s_per_tile_iteration"] = r0["client_block_s_per_tile_iteration_one_tile_per_worker"]
        calibration["client_first_block_s_per_tile_iteration"] = r0["client_first_block_s_per_tile_iteration_one_tile_per_worker"]
    path = write(args.out, {"hop": hop, "rows": rows, "calibration": calibration, "scan": args.scan, "iterations": args.iterations,
                            "update": UPDATE,
                            "command": "python -m benchmarks many_tiles " + " ".join(argv or [])})
    print(path)
