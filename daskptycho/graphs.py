"""Render the schedule: one iteration's graph (pure) and a real run's timeline."""

from __future__ import annotations

import json
import os

import dask
import numpy as np
from distributed import Client, get_task_stream

from .cluster import local_cluster
from .engines import engine_options, reconstruct
from .engines.gd import tiling_for
from .engines.hve import hve_tiles
from .engines.problem import prepare
from .io.store import open_dataset
from .schedule.draw import draw_graph, draw_timeline, pipelining
from .schedule.hve import hve_iteration
from .schedule.passes import gd_iteration
from .simulate import simulate


def _geometry(store, tiles):
    ds = open_dataset(store, check_values=False) if store else simulate(kind="pbtio3", scan=(16, 16), detector=64, slices=1)
    return ds, prepare(ds, engine_options(engine="gd", tiles=tiles, iterations=1))


def render(out, tiles=(3, 3), store=None, timeline=False, workers=2, iterations=3):
    """Write the gd and hve iteration graphs (SVG) into ``out``; with ``timeline``
    also run a small real gd reconstruction and draw its task stream.

    Returns a list of ``(path, description)``.
    """
    ds, problem = _geometry(store, tiles)
    tiling = tiling_for(problem)
    r, c = tiles
    written = []
    # placeholders stand in for futures: building a graph computes nothing
    states = {t.key: ("state", *t.key) for t in tiling}
    data = {t.key: ("data", *t.key) for t in tiling}
    g = gd_iteration(tiling, 0, states, data, "probe", "context")
    path = os.path.join(out, f"gd-iteration-{r}x{c}.svg")
    written.append((draw_graph(g, tiling, path), f"one gd iteration, {len(g.tasks)} tasks"))
    specs = hve_tiles(problem, tiling)
    h = hve_iteration(tiling, {k: e for k, (_, e) in specs.items()}, 0, states, data, "probe", "context", problem.n_positions)
    path = os.path.join(out, f"hve-iteration-{r}x{c}.svg")
    written.append((draw_graph(h, tiling, path), f"one hve iteration, {len(h.tasks)} tasks"))
    if timeline:
        written += _timeline(out, ds, tiles, workers, iterations)
    return written


def _timeline(out, ds, tiles, workers, iterations):
    r, c = tiles
    # the timeline shows the tile graph's tasks one by one (the paper's Fig. 5), not fused or peer stages
    cfg = {"daskptycho.schedule.fuse": "never", "daskptycho.schedule.exchange": "scheduler"}
    with local_cluster(workers) as cluster, Client(cluster) as client, dask.config.set(cfg):
        with get_task_stream(client) as ts:
            res = reconstruct(ds, engine="gd", tiles=tiles, iterations=iterations, client=client)
    tile_workers = {tuple(int(v) for v in k.split(",")): w for k, w in json.loads(res.attrs["memory"])["tile_workers"].items()}
    stream = [rec for rec in ts.data if isinstance(rec.get("key"), (tuple, str))]
    pipe = pipelining(stream, r)
    path = os.path.join(out, f"gd-timeline-{r}x{c}.svg")
    draw_timeline(stream, tile_workers, path, title=f"gd, {r}x{c} tiles on {workers} workers, {iterations} iterations (task stream)")
    summary = {
        "tiles": [r, c], "workers": workers, "iterations": iterations,
        "rounds": {str(k): v for k, v in pipe.items()},
        "rounds_pipelined": int(sum(v["pipelined"] for v in pipe.values())),
        "median_overlap_s": float(np.median([v["overlap_s"] for v in pipe.values()])) if pipe else None,
    }
    jpath = os.path.join(out, f"gd-pipelining-{r}x{c}.json")
    tmp = jpath + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, jpath)
    return [(path, "task stream of a real run"),
            (jpath, f"pipelining: {summary['rounds_pipelined']}/{len(pipe)} rounds, median overlap {summary['median_overlap_s']} s")]
