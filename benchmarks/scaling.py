"""A cost model of ``gd`` and ``hve``, calibrated here, predicting the paper's runs (Tables II/III).

    python -m benchmarks scaling [--engines benchmarks/results/engines.json]

Model of one iteration on P workers, one tile each (tile (r, c) of an R x C grid):

* compute: ``max over tiles of (positions of the tile) x S x c(N)``, with ``c(N)`` the
  measured seconds per position per slice of the single-task engine (``ml`` row of
  ``engines.json``), scaled from the benchmark's pattern size to ``N`` by the FFT's
  ``N^2 log N^2``;
* gd exchanges (:func:`exchange_seconds`): overlap strips (object gradient complex64 +
  illumination float32 = 12 B per voxel) of the real tiling
  (:func:`daskptycho.tiling.make_tiling`), each ``alpha + bytes / beta``. Where no pixel
  lies in three tiles along an axis (the probe-support halos), every pair of neighbours
  swaps its strips at once, along the columns and then the rows: a tile's (up to two)
  strips on one axis, then on the other. Otherwise the forward and backward passes run
  as chains of ``R - 1`` (rows) and ``C - 1`` (columns) hops: ``2 ((R-1) h_row + (C-1)
  h_col)``;
* gd probe refinement (peer rows, the paper's runs keep the probe fixed): the probe
  gradient's sum over the workers and the stepped probe's relay to every worker
  (:func:`probe_seconds`), alongside the strips;
* every dependency between tasks costs a scheduler round trip, measured here
  (:func:`measure_hop`): on one worker, or between two (with a tiny transfer); a gd
  exchange between tiles on different workers adds ``alpha + bytes / beta``; the
  update and the next gradient add a round trip each;
* the scheduler handles the iteration's tasks one after another: ``tasks x (seconds per
  task)`` (measured here on independent trivial tasks) is a floor under the iteration,
  whatever the workers do (gd: grad, tile-cost, update per tile, one strip per exchange,
  the cost; hve: step, tile-cost, paste per tile, one piece per (core, halo) pair);
* hve exchange: each tile sends its neighbours the core voxels in their halos (complex64),
  all tiles at once: ``alpha + bytes / beta`` once per iteration; an hve tile computes
  every position whose window reaches into its core (daskptycho's hve, exact in full
  batch), on the bounding box of those windows;
* memory per worker: object patch + gradient buffer + illumination of the extended
  region (8 + 8 + 4 B per voxel), the tile's patterns (4 B per pixel) and the gradient's
  working set, at least one position, as the GPU path keeps it
  (:func:`daskptycho.physics.wave_checkpoints.gradient_working_set`, ``path="cuda"``):
  with the wave checkpoint interval c (``daskptycho.reconstruct.wave_checkpoints``),
  ``(ceil(S / c) + min(c, S)) K`` complex64 waves of ``N^2`` (the kept checkpoints but the
  probe, one segment's recomputed waves, the wave in flight and the gradient) and a
  float32 cost map; c = 1 keeps every slice's incident wave, ``(S + 1) K`` waves
  (the validation rows, CPU runs, count one position of the NumPy path instead:
  ``(S (K + 1) + 6 K)`` waves). Recomputing multiplies the compute by the FFT ratio
  ``1 + (ceil(S / c) - 1)(c - 1) / (2 S - 1)`` (per position and mode ``2 (2 S - 1)``
  FFTs, 2 more per repeated propagation). The paper's rows give c = 1 and the c that
  ``wave_checkpoints: auto`` picks on a 16 GB V100 (:data:`V100_BYTES`): every wave kept
  when one position fits ``gpu.memory_fraction`` (0.5) of what the tile's state leaves
  free, else the least c that fits (the least memory when none does).

``alpha`` and ``beta`` are measured here on loopback between two LocalCluster worker
processes; for the paper's machine (Summit: 6 V100 per node, EDR InfiniBand 100 Gb/s per
node, NVLink 50 GB/s per link) we assume ``alpha = 20 us`` and ``beta = 2 GB/s`` per GPU
(the node's 12.5 GB/s shared by 6 GPUs, protocol overhead included), and a Dask
scheduler as fast per task and per round trip as the one measured here. The V100's compute
per position per slice is assumed ``c_cpu(N) x f_gpu``: FFT-bound at HBM2 bandwidth
(900 GB/s; a 1024^2 complex64 FFT reads and writes 8 MiB twice: ~37 us) divided by the
floor fraction measured here for ``ml``.

Validation: the same model, with the tiling of the engines benchmark's dataset and
two tiles' compute serialised per worker when tiles outnumber workers, against the
measured ``gd`` (1, 4, 9, 16 tiles) and ``hve`` (4 tiles) rows of ``engines.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from .common import RESULTS, write

# The paper's Tables II and III (runtime: minutes for 100 iterations; memory: GB per GPU)
PAPER = {
    "small": {"positions": 4158, "scan": (63, 66), "object_px": 1536, "slices": 100, "N": 1024,
              "gd": {6: (2.53, 360.0), 24: (1.20, 73.0), 54: (0.58, 20.6), 126: (0.39, 11.5), 198: (0.31, 5.5), 462: (0.23, 3.0)},
              "hve": {6: (2.80, 463.3), 24: (1.20, 95.3), 54: (0.78, 43.7)}},
    "large": {"positions": 16632, "scan": (126, 132), "object_px": 3072, "slices": 100, "N": 1024,
              "gd": {6: (9.14, 5543.0), 54: (1.54, 183.0), 198: (0.66, 37.5), 462: (0.42, 14.2), 924: (0.32, 7.0), 4158: (0.18, 2.2)},
              "hve": {6: (9.47, 7213.3), 54: (1.8, 271.7), 198: (0.78, 59.2), 462: (0.48, 189.5)}},
}
WORKERS = (6, 24, 54, 126, 198, 462, 924, 4158)
# gd's halo in the paper (600 pm at 10 pm pixels): a probe-support halo (engines/gd.py halo_for)
PAPER_HALO_PX = (60, 60)
SUMMIT = {"alpha_s": 20e-6, "beta_bytes_per_s": 2e9}
# between the 6 GPUs of a Summit node: NVLink, 50 GB/s per link one way (the paper, section VI.A)
SUMMIT_NODE = {"gpus": 6, "alpha_s": 10e-6, "beta_bytes_per_s": 50e9}
V100_FFT_1024_S = 4 * 8 * 1024 * 1024 / 900e9  # two read+write passes of 8 MiB at 900 GB/s
V100_BYTES = 16e9  # Summit's V100s: 16 GB of HBM2 each


def _s(row):
    """A row's time per iteration: the steady-state median over runs (older results: the interval median)."""
    return row.get("s_per_iteration", row.get("iteration_s_median"))


def grid_shape(p):
    """R x C with R * C = p, as square as possible."""
    r = int(math.isqrt(p))
    while p % r:
        r -= 1
    return r, p // r


def measure_loopback(sizes_mib=(1, 8, 64), repeats=5):
    """alpha (s) and beta (B/s) of a worker-to-worker transfer on this machine: least squares
    through the fastest of ``repeats`` transfers of each size (what the link can do; on a
    shared machine single transfers stall for tens of ms, which a fit through all of them
    turns into a negative slope)."""
    from distributed import Client, get_task_stream

    from daskptycho.cluster import local_cluster

    xs, ts = [], []
    with local_cluster(2, memory_limit=0) as cl, Client(cl) as c:
        a, b = sorted(c.nthreads())
        for mib in sizes_mib:
            for k in range(repeats):
                src = c.submit(np.ones, mib * 2**20, dtype=np.uint8, key=f"src-{mib}-{k}", workers=[a], pure=False)
                src.result()
                with get_task_stream(client=c) as stream:
                    c.submit(len, src, key=f"dst-{mib}-{k}", workers=[b], pure=False).result()
                tr = [ss["stop"] - ss["start"] for r in stream.data for ss in r["startstops"] if ss["action"] == "transfer"]
                if tr:
                    xs.append(mib * 2**20)
                    ts.append(sum(tr))
    sizes = sorted(set(xs))
    best = [min(t for x, t in zip(xs, ts) if x == size) for size in sizes]
    A = np.stack([np.ones(len(sizes)), np.asarray(sizes, float)], axis=1)
    (alpha, inv_beta), *_ = np.linalg.lstsq(A, np.asarray(best), rcond=None)
    return {"alpha_s": max(float(alpha), 0.0), "beta_bytes_per_s": 1.0 / max(float(inv_beta), 1e-15),
            "fastest": [{"bytes": x, "s": t} for x, t in zip(sizes, best)],
            "samples": [{"bytes": x, "s": t} for x, t in zip(xs, ts)]}


def _inc(x):
    return x + 1


def _same(x):
    return x


def measure_peer_hop(n=200, repeats=3, payload_bytes=1024):
    """Seconds per message of the peer exchange (:mod:`daskptycho.tasks.peer`): two peer
    stages on a 2-worker LocalCluster bounce a ``payload_bytes`` array ``n`` times (each
    stage's task ``i`` waits for message ``i - 1`` from the other and sends message ``i``),
    no scheduler in between; the median over ``repeats`` of wall time / ``n``."""
    from distributed import Client

    from daskptycho.cluster import local_cluster
    from daskptycho.tasks import peer
    from daskptycho.tasks.stage import StageSpec

    times = []
    with local_cluster(2, memory_limit=0) as cl, Client(cl) as c:
        c.register_plugin(peer.PeerExchange())
        ws = sorted(c.nthreads())
        for rep in range(repeats):
            channel = f"hop{rep}|0"
            specs = []
            for w in range(2):
                tasks, sends = [], []
                for i in range(w, n, 2):
                    arg = np.zeros(payload_bytes, np.uint8) if i == 0 else peer.Receive(i - 1)
                    tasks.append(((f"m{i}",), (_same, arg)))
                    if i < n - 1:
                        sends.append(((f"m{i}",), i, (ws[1 - w],)))
                specs.append(peer.PeerStage(StageSpec(tuple(tasks), ()), channel, tuple(sends), (ws[1 - w],), 120.0))
            t0 = time.perf_counter()
            futs = [c.submit(peer.run_peer_stage, specs[w], key=f"bounce-{rep}-{w}", workers=[ws[w]], allow_other_workers=False,
                             pure=False) for w in range(2)]
            c.gather(futs)
            times.append((time.perf_counter() - t0) / n)
            del futs
    return float(np.median(times))


def measure_hop(n=200, repeats=3):
    """Seconds per link of a chain of trivial dependent tasks on a 2-worker LocalCluster
    (as a run sets its message batching, :mod:`daskptycho.latency`): on one worker and
    alternating between the two (a tiny transfer per link). Median of ``repeats`` chains.

    Each dependency of a task graph costs one such scheduler round trip before the next
    task can start; a gd exchange is one (the strip is applied by the receiver's next task).
    """
    import dask
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
    from distributed import Client

    from daskptycho import latency
    from daskptycho.cluster import local_cluster

    out = {}
    with local_cluster(2, memory_limit=0) as cl, Client(cl) as c:
        applied = latency.apply(c)
        ws = sorted(c.nthreads())
        for label, spread in (("same_worker_s", 1), ("alternating_s", 2)):
            times = []
            for rep in range(repeats):
                name = f"hop-{label}-{rep}"
                dsk = {(name, 0): (_inc, 0)}
                for i in range(1, n):
                    dsk[(name, i)] = (_inc, (name, i - 1))
                layers = {f"{name}-{w}": MaterializedLayer({k: v for k, v in dsk.items() if k[1] % spread == w},
                                                           annotations={"workers": [ws[w]], "allow_other_workers": False})
                          for w in range(spread)}
                hlg = HighLevelGraph(layers, {k: set() for k in layers})
                with dask.config.set({"optimization.fuse.active": False}):
                    fut = c.get(hlg, [(name, n - 1)], sync=False)[0]
                t0 = time.perf_counter()
                fut.result()
                times.append((time.perf_counter() - t0) / n)
                del fut
            out[label] = float(np.median(times))
        # the scheduler's throughput: independent trivial tasks on both workers
        times = []
        for rep in range(repeats):
            name = f"wide-{rep}"
            layers = {f"{name}-{w}": MaterializedLayer({(name, i): (_inc, i) for i in range(w, 2000, 2)},
                                                       annotations={"workers": [ws[w]], "allow_other_workers": False})
                      for w in range(2)}
            hlg = HighLevelGraph(layers, {k: set() for k in layers})
            t0 = time.perf_counter()
            futs = c.get(hlg, [(name, i) for i in range(2000)], sync=False)
            c.gather(futs)
            times.append((time.perf_counter() - t0) / 2000)
            del futs
        out["per_task_s"] = float(np.median(times))
    out["message_interval_s"] = applied
    return out


def tiling_of(corners, window, object_shape, tiles, halo_px=None):
    from daskptycho.geometry import ObjectGrid
    from daskptycho.tiling import make_tiling

    grid = ObjectGrid((0.0, 0.0), tuple(object_shape), 1.0)
    return make_tiling(grid, corners, window, tiles, halo_px, clip_windows=halo_px is not None)


def _area(reg):
    return (reg[1] - reg[0]) * (reg[3] - reg[2])


def _overlap(a, b):
    y0, y1 = max(a[0], b[0]), min(a[1], b[1])
    x0, x1 = max(a[2], b[2]), min(a[3], b[3])
    return max(0, y1 - y0) * max(0, x1 - x0)


def model(corners, window, object_shape, tiles, slices, c_pos_slice, alpha, beta, workers=None, modes=1, engine="gd",
          hop=None, per_task=0.0, halo_px=None, schedule="tile graph", block=8, peer_hop_s=0.0, node_size=None, intra=None,
          client_per_tile=0.0, client_first_per_tile=0.0, iterations=100, wave_checkpoints=1, working_path="batched",
          refine_probe=False, probe_steppers=4, rounds=1):
    """Predicted seconds per iteration and bytes per worker for one tiling.

    ``hop``: ``{"same_worker_s": s, "alternating_s": s}``, the scheduler round trip of one
    dependency (:func:`measure_hop`); ``per_task``: the scheduler's seconds per task;
    ``halo_px``: gd's halo (None: whole windows; narrower: probe-support halos, the
    windows clipped at the tiles' extended regions).

    ``schedule="peer"`` (gd, ``daskptycho.schedule.exchange: peer``): a strip between two
    workers is a message from stage to stage, ``max(peer_hop_s, alpha) + bytes / beta``
    with ``peer_hop_s`` the measured software cost of one message
    (:func:`measure_peer_hop`), and no scheduler round trip; the scheduler sees, per block
    of ``block`` iterations, one stage and one message (the tiles' costs) per worker, and
    one task computing the block's costs. ``node_size`` workers in a row of the placement share a node,
    whose messages between its own workers go at ``intra = (alpha, beta)``.

    ``client_per_tile``: the client's seconds per tile and iteration to make a block's graph
    (peer: rebinding the first block of its shape; measured by :mod:`benchmarks.many_tiles`),
    a serial floor like the scheduler's. ``client_first_per_tile``: the same for the first
    block of each shape (building and fusing every tile's tasks), paid once per run of
    ``iterations`` before anything runs: ``first_blocks_s``, for the blocks of ``block``
    iterations and the shorter last one.

    ``wave_checkpoints``: the adjoint's checkpoint interval c; ``working_path``: whose
    working set per position counts (:func:`gradient_terms`; ``"cuda"`` for GPU runs).

    ``rounds`` (gd): pass rounds per iteration (minibatches; may be a mean over the run):
    each has its own exchanges (and tile-graph tasks), the compute is the iteration's.

    ``refine_probe`` (gd, peer): each round also sums the probe gradient over the workers and
    hands the stepped probe to every worker (:func:`probe_seconds`), alongside the strips:
    the round waits for the longer of the two.
    """
    t = tiling_of(corners, window, object_shape, tiles, halo_px if engine == "gd" else None)
    r, c = tiles
    probe_s = 0.0
    workers = workers or r * c
    hop = hop or {"same_worker_s": 0.0, "alternating_s": 0.0}
    n2 = window[0] * window[1]
    centre = np.asarray(corners) + np.asarray(window) // 2
    per_tile = {}
    cy, cx = np.asarray(corners)[:, 0], np.asarray(corners)[:, 1]
    hve_ext = {}
    for tile in t:
        y0, y1, x0, x1 = tile.core
        if engine == "hve":
            # daskptycho's hve (engines/hve.py): every position whose window reaches into
            # the core, on the bounding box of those windows
            inside = (cy < y1) & (cy + window[0] > y0) & (cx < x1) & (cx + window[1] > x0)
            if inside.any():
                hve_ext[(tile.row, tile.col)] = (min(y0, int(cy[inside].min())), max(y1, int(cy[inside].max()) + window[0]),
                                                 min(x0, int(cx[inside].min())), max(x1, int(cx[inside].max()) + window[1]))
        else:
            inside = (centre[:, 0] >= y0) & (centre[:, 0] < y1) & (centre[:, 1] >= x0) & (centre[:, 1] < x1)
        per_tile[(tile.row, tile.col)] = (int(inside.sum()), tile)
    # tiles are placed in contiguous blocks on the workers: a worker computes its tiles in turn
    per_worker = max(1, math.ceil(r * c / workers))
    working, factor = gradient_terms(slices, modes, window, wave_checkpoints, working_path)
    # c_pos_slice is calibrated with every wave kept: the repeated propagations scale it by their FFTs
    compute = max(n for n, _ in per_tile.values()) * slices * c_pos_slice * per_worker * factor
    tiles_list = {k: v[1] for k, v in per_tile.items()}
    # the driver's placement (TileDriver.place_tiles): contiguous row-major blocks per worker
    order = sorted(tiles_list)
    worker_of = {k: i * workers // len(order) for i, k in enumerate(order)}
    if engine == "gd" and schedule == "peer":
        def node(k):
            return worker_of[k] // node_size if node_size else worker_of[k]

        def link(a, b):
            # a strip from one stage to the next worker's, on the workers' own connections
            if worker_of[a] == worker_of[b]:
                return 0.0  # inside one stage
            size = _overlap(tiles_list[a].extended, tiles_list[b].extended) * slices * 12
            if intra is not None and node(a) == node(b):
                return max(peer_hop_s, intra[0]) + size / intra[1]
            return max(peer_hop_s, alpha) + size / beta
        comm = rounds * exchange_seconds(t, link)
        n_workers = len(set(worker_of.values()))
        tasks = (2 * n_workers + 1) / block  # a stage and a message per worker, and the costs, per block
        if refine_probe:
            probe_s = rounds * probe_seconds(n_workers, modes, window, max(peer_hop_s, alpha), beta, probe_steppers)
    elif engine == "gd":
        def link(a, b):
            # one exchange: a strip task whose result the neighbour's next task reads; a
            # scheduler round trip, and a transfer when the two tiles live on different workers
            if worker_of[a] == worker_of[b]:
                return hop["same_worker_s"]
            return hop["alternating_s"] + alpha + _overlap(tiles_list[a].extended, tiles_list[b].extended) * slices * 12 / beta
        # the exchanges, then the update and the next gradient
        comm = rounds * (exchange_seconds(t, link) + 2 * hop["same_worker_s"])
        tasks = rounds * (3 * r * c + 2 * ((r - 1) * c + (c - 1) * r)) + 1  # grad, tile-cost, update; strips; cost
    else:
        exts = {k: hve_ext.get(k, tiles_list[k].extended) for k in tiles_list}
        sent = max(sum(_overlap(tiles_list[k].core, exts[o]) for o in tiles_list if o != k) for k in tiles_list)
        pieces = sum(1 for k in tiles_list for o in tiles_list if o != k and _overlap(tiles_list[k].core, exts[o]))
        comm = ((alpha + sent * slices * 8 / beta + hop["alternating_s"]) if workers > 1 else hop["same_worker_s"]) + 2 * hop["same_worker_s"]
        tasks = 3 * r * c + pieces + 1  # step, tile-cost, paste; core pieces; cost
    ext = max(_area(tile.extended) for tile in t) if engine == "gd" else max(_area(e) for e in (hve_ext or {0: t.tiles[0].extended}).values())
    n_max = max(n for n, _ in per_tile.values())
    mem = (ext * slices * 20 + n_max * n2 * 4) * per_worker + working
    scheduler = tasks * per_task
    client = client_per_tile * r * c
    first_blocks = client_first_per_tile * r * c * (block + iterations % block) if schedule == "peer" else 0.0
    return {"compute_s": compute, "comm_s": comm, "scheduler_s": scheduler, "tasks": tasks, "client_s": client, "first_blocks_s": first_blocks,
            # the scheduler and the client (building the next graphs) work while the tiles compute:
            # their serial times per iteration are floors
            "iteration_s": max(compute + max(comm, probe_s), scheduler, client), "memory_bytes": mem, "probe_s": probe_s,
            "working_bytes": working, "compute_factor": factor, "wave_checkpoints": wave_checkpoints,
            "max_positions_per_tile": n_max, "extended_px_max": ext, "halo_px": list(t.halo)}


def exchange_seconds(tiling, link):
    """Seconds of one round's strip exchanges on the critical path, ``link(a, b)`` the
    seconds of the strip from tile ``a`` to its neighbour ``b``.

    Where :func:`~daskptycho.schedule.passes.neighbour_exchange` holds (the default
    probe-support halos on any but the smallest cores), every pair of neighbours swaps its
    strips at once, first along the columns, then along the rows: a tile's exchanges on one
    axis (up to two strips, counted one after the other) and then on the other. Otherwise
    the forward and backward passes run along each column and each row as chains of
    strips (:func:`~daskptycho.schedule.passes.accumulate_passes`).
    """
    from daskptycho.schedule.passes import neighbour_exchange

    r, c = tiling.rows, tiling.cols
    if neighbour_exchange(tiling):
        def axis(step):
            per_tile = {}
            for i in range(r):
                for j in range(c):
                    b = (i + step[0], j + step[1])
                    if b[0] < r and b[1] < c:
                        per_tile[(i, j)] = per_tile.get((i, j), 0.0) + link((i, j), b)
                        per_tile[b] = per_tile.get(b, 0.0) + link(b, (i, j))
            return max(per_tile.values(), default=0.0)
        return axis((1, 0)) + axis((0, 1))
    row_hops = max((sum(link((i, j), (i, j + 1)) for j in range(c - 1)) for i in range(r)), default=0.0)
    col_hops = max((sum(link((i, j), (i + 1, j)) for i in range(r - 1)) for j in range(c)), default=0.0)
    return 2 * (row_hops + col_hops)


def probe_seconds(workers, modes, window, latency, beta, steppers=4):
    """Seconds one round's probe refinement adds to the critical path with ``workers``
    workers (:func:`~daskptycho.schedule.passes.gd_iteration` with ``probe_homes``): the
    probe-gradient sum's pairwise tree over the workers (``ceil(log2 workers)`` messages of
    the probe gradient and its illumination, ``(8 K + 4) N^2`` bytes, in a row), the two
    halves of its top to each of the ``steppers`` workers that step the probe, then the
    stepped probe (``8 K N^2`` bytes) relayed down a binary tree to the others
    (``ceil(log2(workers / steppers))`` messages in a row). Each message costs ``latency +
    bytes / beta``; a sender's messages to several workers share its link.
    ``steppers = workers`` is every worker stepping its own copy from the halves.
    """
    if workers <= 1:
        return 0.0
    n2 = window[0] * window[1]
    grad_bytes, probe_bytes = (8 * modes + 4) * n2, 8 * modes * n2
    f = min(steppers, workers)
    levels = math.ceil(math.log2(workers))
    relays = math.ceil(math.log2(workers / f)) if workers > f else 0
    return (levels * (latency + grad_bytes / beta) + latency + f * grad_bytes / beta
            + relays * (latency + 2 * probe_bytes / beta))


def gradient_terms(slices, modes, window, wave_checkpoints=1, path="batched"):
    """(bytes of one position's gradient working set, compute factor) at checkpoint interval
    ``wave_checkpoints``: :func:`daskptycho.physics.wave_checkpoints.gradient_working_set` on
    ``path``, and the FFTs of a position's gradient over those with every wave kept."""
    from daskptycho.physics import wave_checkpoints as wc

    working = wc.gradient_working_set(slices, modes, window, wave_checkpoints, path)
    return working, wc.gradient_ffts(slices, modes, wave_checkpoints) / wc.gradient_ffts(slices, modes, 1)


def with_wave_checkpoints(m, slices, modes, window, interval, path="cuda"):
    """A :func:`model` result (made at interval 1) at another checkpoint interval: the
    working set swapped, the compute scaled by its FFT factor (the other terms unchanged)."""
    working, factor = gradient_terms(slices, modes, window, interval, path)
    base_working, base_factor = gradient_terms(slices, modes, window, m["wave_checkpoints"], path)
    compute = m["compute_s"] * factor / base_factor
    return {**m, "compute_s": compute, "iteration_s": max(compute + m["comm_s"], m["scheduler_s"], m["client_s"]),
            "memory_bytes": m["memory_bytes"] - base_working + working, "working_bytes": working, "compute_factor": factor,
            "wave_checkpoints": interval}


def auto_wave_checkpoints(m, slices, modes, window, device_bytes=V100_BYTES, fraction=0.5):
    """The interval ``wave_checkpoints: auto`` picks on a GPU of ``device_bytes`` for a
    :func:`model` result: the launch budget is ``fraction`` (``gpu.memory_fraction``) of
    the memory the tile's state leaves free (:func:`daskptycho.physics.cuda.launch_budget`)."""
    from daskptycho.physics import wave_checkpoints as wc

    free = max(device_bytes - (m["memory_bytes"] - m["working_bytes"]), 0.0)
    return wc.wave_checkpoint_interval(slices, modes, window, fraction * free, "cuda")


def _halo_px(problem):
    from daskptycho.engines.gd import halo_for

    return halo_for(problem)


def paper_corners(case):
    """Window corners of the paper's raster: ``scan`` positions spread evenly so the
    object is ``object_px`` wide with ``N``-pixel windows."""
    ny, nx = case["scan"]
    n = case["N"]
    span = case["object_px"] - n
    ys = np.rint(np.linspace(0, span, ny)).astype(int)
    xs = np.rint(np.linspace(0, span, nx)).astype(int)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks scaling")
    p.add_argument("--engines", default=os.path.join(RESULTS, "engines.json"))
    p.add_argument("--floor", default=os.path.join(RESULTS, "fft_floor.json"))
    a = p.parse_args(argv)

    import dask

    import daskptycho as dp
    from daskptycho.engines import engine_options
    from daskptycho.engines.problem import prepare
    from daskptycho.tasks.updates import AUTO_MINIBATCHES

    load0 = os.getloadavg()
    with open(a.engines) as f:
        eng = json.load(f)
    with open(a.floor) as f:
        floor = json.load(f)
    rows = {r["label"]: r for r in eng["rows"]}
    ml = rows["ml"]
    cnt = eng["fft_count"]["ml"]
    n_bench = int(eng["detector"])
    slices_bench = ml["slices"]
    c_bench = _s(ml) / (cnt["positions"] * slices_bench)
    floor_fraction = ml["floor_fraction"]
    t0 = time.perf_counter()
    loop = measure_loopback()
    print(f"loopback: alpha {loop['alpha_s'] * 1e3:.2f} ms, beta {loop['beta_bytes_per_s'] / 1e9:.2f} GB/s "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    hop = measure_hop()
    # the scheduler's seconds per task of a real iteration graph, measured by benchmarks/many_tiles.py
    # (tasks with dependencies and data cost more than the trivial ones measure_hop times)
    many = os.path.join(RESULTS, "many_tiles.json")
    per_task_graph, per_task_source = hop["per_task_s"], "independent trivial tasks (measure_hop)"
    client_per_tile = client_first_per_tile = 0.0
    if os.path.exists(many):
        with open(many) as f:
            cal = json.load(f).get("calibration")
        if cal:
            per_task_graph = cal["per_task_s"]
            client_per_tile = float(cal.get("client_s_per_tile_iteration", 0.0))
            client_first_per_tile = float(cal.get("client_first_block_s_per_tile_iteration", 0.0))
            per_task_source = f"a {cal['from_tiles']}-tile gd iteration graph on 2 workers (benchmarks/many_tiles.py)"
    peer_hop_s = measure_peer_hop()
    block = int(dask.config.get("daskptycho.schedule.block_iterations", 8))
    print(f"peer message: {peer_hop_s * 1e3:.3f} ms", flush=True)
    print(f"scheduler round trip per dependency: {hop['same_worker_s'] * 1e3:.2f} ms on one worker, "
          f"{hop['alternating_s'] * 1e3:.2f} ms between two; {hop['per_task_s'] * 1e3:.3f} ms per independent task", flush=True)

    # validation on the engines benchmark's dataset
    scan = int(eng["scan"])
    ds = dp.simulate(kind="pbtio3", scan=(scan, scan), detector=n_bench, slices=slices_bench)
    prob = prepare(ds, engine_options(dict(engine="gd", slices=slices_bench, iterations=1)))
    validation = []
    for label, r in rows.items():
        if r["engine"] not in ("gd", "hve"):
            continue
        side = int(round(math.sqrt(r["tiles"])))
        schedule = "peer" if r.get("exchange") == "peer" and r["engine"] == "gd" else "tile graph"
        m = model(prob.corners, prob.window, prob.grid.shape, (side, side), slices_bench, c_bench,
                  loop["alpha_s"], loop["beta_bytes_per_s"], workers=r["workers"], engine=r["engine"],
                  hop=hop, per_task=hop["per_task_s"], schedule=schedule, block=block, peer_hop_s=peer_hop_s)
        validation.append({"label": label, "schedule": schedule, "measured_s": _s(r), "predicted_s": m["iteration_s"],
                           "predicted_compute_s": m["compute_s"], "predicted_comm_s": m["comm_s"],
                           "predicted_scheduler_s": m["scheduler_s"], "tasks": m["tasks"],
                           "ratio_measured_over_predicted": _s(r) / m["iteration_s"],
                           "measured_peak_bytes": r["peak_above_baseline_bytes_max"], "predicted_memory_bytes": m["memory_bytes"]})
        print(f"validate {label:24s} measured {_s(r):.3f} s  predicted {m['iteration_s']:.3f} s "
              f"(compute {m['compute_s']:.2f}, comm {m['comm_s']:.3f})", flush=True)

    # the default run's case (benchmarks/default_run.py): gd 2x2 on 2 workers, peer and tile graph
    dr_path = os.path.join(RESULTS, "default_run.json")
    if os.path.exists(dr_path):
        with open(dr_path) as f:
            dr = json.load(f)
        drows = {x["label"]: x for x in dr["rows"]}
        dds = dp.simulate(kind="image", scan=(26, 26), detector=96)
        dprob = prepare(dds, engine_options(dict(engine="gd", iterations=1)))
        def per_iteration(row):  # the whole run's span (benchmarks/default_run.py)
            return row["run"]["s_per_iteration"] if "run" in row else row["s_per_iteration"]

        c_dr = per_iteration(drows["ml, 1 worker"]) / dprob.n_positions
        for label, schedule in (("gd 2x2 (default)", "peer"), ("gd 2x2, scheduler exchange", "tile graph")):
            if label not in drows:
                continue
            # the run's mean rounds per iteration: its minibatch iterations have AUTO_MINIBATCHES rounds
            mb = float(dr.get("minibatch_iterations", 0)) / max(float(dr.get("iterations", 1)), 1.0)
            m = model(dprob.corners, dprob.window, dprob.grid.shape, (2, 2), 1, c_dr, loop["alpha_s"], loop["beta_bytes_per_s"],
                      workers=2, engine="gd", hop=hop, per_task=hop["per_task_s"], halo_px=_halo_px(dprob), schedule=schedule,
                      block=int(dr.get("block_iterations") or block), peer_hop_s=peer_hop_s, refine_probe=True,
                      rounds=mb * AUTO_MINIBATCHES + (1 - mb))
            meas = per_iteration(drows[label])
            validation.append({"label": f"default run: {label}", "schedule": schedule, "measured_s": meas, "predicted_s": m["iteration_s"],
                               "predicted_compute_s": m["compute_s"], "predicted_comm_s": m["comm_s"],
                               "predicted_scheduler_s": m["scheduler_s"], "tasks": m["tasks"],
                               "ratio_measured_over_predicted": meas / m["iteration_s"]})
            print(f"validate {label:24s} measured {meas:.3f} s  predicted {m['iteration_s']:.3f} s", flush=True)

    # the paper's datasets
    n = 1024
    scale = (n * n * math.log2(n * n)) / (n_bench * n_bench * math.log2(n_bench * n_bench))
    c_cpu = c_bench * scale
    ffts_per_pos_slice = cnt["ffts"] / (cnt["positions"] * slices_bench)
    c_gpu = ffts_per_pos_slice * V100_FFT_1024_S / max(floor_fraction or 1.0, 1e-3)
    predictions = []
    for name, case in PAPER.items():
        corners = paper_corners(case)
        shape = (case["object_px"], case["object_px"])
        for engine, halo, schedule in (("gd", None, "tile graph"), ("gd", PAPER_HALO_PX, "tile graph"), ("gd", PAPER_HALO_PX, "peer"),
                                       ("hve", None, "tile graph")):
            for w in WORKERS:
                tiles = grid_shape(w)
                try:
                    m = model(corners, (n, n), shape, tiles, case["slices"], c_gpu, SUMMIT["alpha_s"], SUMMIT["beta_bytes_per_s"],
                              engine=engine, hop={"same_worker_s": hop["same_worker_s"], "alternating_s": hop["same_worker_s"]},
                              per_task=per_task_graph, halo_px=halo, schedule=schedule, block=block, peer_hop_s=peer_hop_s,
                              node_size=SUMMIT_NODE["gpus"], intra=(SUMMIT_NODE["alpha_s"], SUMMIT_NODE["beta_bytes_per_s"]),
                              client_per_tile=client_per_tile, client_first_per_tile=client_first_per_tile,
                              working_path="cuda")
                except Exception as e:  # noqa: BLE001 - a tiling that cannot be made is a result, not a crash
                    predictions.append({"dataset": name, "engine": engine, "workers": w, "schedule": schedule, "error": str(e)})
                    continue
                paper = case[engine].get(w)
                row = {"dataset": name, "engine": engine, "workers": w, "tiles": list(tiles), "schedule": schedule,
                       "halos": "whole windows" if halo is None else f"probe support ({halo[0]} px, the paper's)",
                       "predicted_minutes_100_it_v100": (m["iteration_s"] * 100 + m["first_blocks_s"]) / 60,
                       "predicted_first_blocks_minutes": m["first_blocks_s"] / 60,
                       "predicted_compute_minutes": m["compute_s"] * 100 / 60, "predicted_comm_minutes": m["comm_s"] * 100 / 60,
                       "predicted_scheduler_minutes": m["scheduler_s"] * 100 / 60, "tasks_per_iteration": m["tasks"],
                       "predicted_client_minutes": m["client_s"] * 100 / 60,
                       "predicted_minutes_100_it_cpu_core": (m["iteration_s"] - m["compute_s"] + m["compute_s"] * c_cpu / c_gpu) * 100 / 60,
                       "predicted_memory_gb": m["memory_bytes"] / 1e9,
                       "paper_memory_gb": paper[0] if paper else None, "paper_minutes": paper[1] if paper else None,
                       "halo_px": m["halo_px"], "extended_px_max": m["extended_px_max"], "max_positions_per_tile": m["max_positions_per_tile"]}
                if engine == "gd" and schedule == "peer":
                    # the paper's runs keep the probe fixed; refined, as users run it: relayed down a tree of
                    # workers (probe_steppers 4), and as if every worker stepped its own copy from the halves
                    latency = max(peer_hop_s, SUMMIT["alpha_s"])
                    for key, steppers in (("probe_refined", 4), ("probe_refined_every_worker_steps", w)):
                        ps = probe_seconds(w, 1, (n, n), latency, SUMMIT["beta_bytes_per_s"], steppers)
                        it_s = max(m["compute_s"] + max(m["comm_s"], ps), m["scheduler_s"], m["client_s"])
                        row[f"{key}_probe_s_per_round"] = ps
                        row[f"{key}_minutes_100_it_v100"] = (it_s * 100 + m["first_blocks_s"]) / 60
                if name == "large":  # every wave kept (the figures above), and the interval auto picks on a 16 GB V100
                    c_auto = auto_wave_checkpoints(m, case["slices"], 1, (n, n))
                    ma = with_wave_checkpoints(m, case["slices"], 1, (n, n), c_auto)
                    row.update({"wave_checkpoints_c1_memory_gb": m["memory_bytes"] / 1e9,
                                "wave_checkpoints_c1_minutes_100_it_v100": row["predicted_minutes_100_it_v100"],
                                "wave_checkpoints_budget": "auto on a 16 GB V100: gpu.memory_fraction 0.5 of what the tile's state leaves free",
                                "wave_checkpoints_auto": c_auto, "wave_checkpoints_auto_compute_factor": ma["compute_factor"],
                                "wave_checkpoints_auto_memory_gb": ma["memory_bytes"] / 1e9,
                                "wave_checkpoints_auto_minutes_100_it_v100": (ma["iteration_s"] * 100 + ma["first_blocks_s"]) / 60,
                                "wave_checkpoints_by_interval": {
                                    c: {"working_set_gb": mc["working_bytes"] / 1e9, "memory_gb": mc["memory_bytes"] / 1e9,
                                        "compute_factor": mc["compute_factor"],
                                        "minutes_100_it_v100": (mc["iteration_s"] * 100 + mc["first_blocks_s"]) / 60}
                                    for c, mc in ((c, with_wave_checkpoints(m, case["slices"], 1, (n, n), c)) for c in (1, 2, 3, 10))}})
                predictions.append(row)
                print(f"{name:5s} {engine:3s} {w:5d} workers: {row['predicted_minutes_100_it_v100']:9.1f} min "
                      f"(paper {row['paper_minutes']}), {row['predicted_memory_gb']:.2f} GB (paper {row['paper_memory_gb']})", flush=True)
    path = write("scaling", {
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "calibration": {"c_pos_slice_s_at_bench": c_bench, "bench_N": n_bench, "c_pos_slice_s_cpu_1024": c_cpu,
                        "c_pos_slice_s_v100_1024_assumed": c_gpu, "v100_fft_1024_s_assumed": V100_FFT_1024_S,
                        "ml_floor_fraction": floor_fraction, "ffts_per_position_per_slice": ffts_per_pos_slice,
                        "best_us_per_fft_bench": floor["best_us_per_fft_cpu"].get(str(n_bench))},
        "loopback": loop, "hop": hop, "summit_assumed": SUMMIT, "summit_node_assumed": SUMMIT_NODE,
        "peer_message_s": peer_hop_s, "block_iterations": block, "client_s_per_tile_iteration": client_per_tile,
        "client_first_block_s_per_tile_iteration": client_first_per_tile,
        "scheduler_per_task_s": per_task_graph, "scheduler_per_task_source": per_task_source,
        "validation": validation, "predictions": predictions,
        "command": "python -m benchmarks scaling " + " ".join(argv or []),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
