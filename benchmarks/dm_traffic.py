"""Bytes engine ``dm`` moves between workers per iteration, from the workers' transfer logs.

    python -m benchmarks dm_traffic --label after      # or --label before (the code before issue 16)

A simulated X-ray scan (``image``, 32x32 positions, 32 px patterns, 2 probe modes,
probe refined from the first iteration), 4 parts on 2 single-threaded workers, 3
iterations. Each worker keeps a log of what it fetched from other workers
(``Worker.transfer_incoming_log``: per transfer, the keys and their sizes); the logs are
cleared before the run and read after it. Each key names its task kind and (for the
tasks of an iteration) the iteration, so the bytes are summed per iteration and per kind;
what does not belong to an iteration (the run's context, the start, the final fetch)
is reported apart. The largest single message of an iteration is compared with the
object (complex64) and with a float64 full-grid message.

The target (issue 16): bytes per iteration at most the parts' crops (complex64) plus
their partial sums, and no float64 full-grid message. The JSON keeps one entry per
label (``before``, ``after``), so a new run of one label leaves the other's figures.
``before`` was measured on the package of commit 1387962 (``git archive 1387962
daskptycho`` unpacked in a directory holding a copy of ``benchmarks/``, run from there);
``result_sha256`` shows both give the same result, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from collections import defaultdict

import numpy as np

from .common import RESULTS, write


def _clear_logs(dask_worker=None):
    dask_worker.transfer_incoming_log.clear()
    dask_worker.transfer_outgoing_log.clear()


def _incoming(dask_worker=None):
    """What this worker fetched from other workers: ``[(who, {key: nbytes}), ...]``."""
    return [(e["who"], dict(e["keys"])) for e in dask_worker.transfer_incoming_log]


def _kind_and_iteration(key):
    if isinstance(key, tuple) and key and isinstance(key[0], str):
        it = key[1] if len(key) > 2 and isinstance(key[1], (int, np.integer)) else None
        return key[0], it
    return str(key).split("-")[0], None


def _role(key):
    """What a transferred key is, whatever the version of the engine: the whole object, a
    part's crop of it, object or probe partial sums, the probe and mixing, or other."""
    kind, _ = _kind_and_iteration(key)
    if kind in ("dm-sum", "dm-partial"):
        return "object partial sums"
    if kind == "dm-crop" or (kind == "dm-object" and len(key) > 3):  # ("dm-object", it, 0, p, tag): part p's crop
        return "object crops"
    if kind in ("dm-object", "dm-object-update", "dm-object-init", "dm-object-restore"):
        return "whole object"
    if kind in ("dm-probe-sum", "dm-probe-partial"):
        return "probe partial sums"
    if kind in ("dm-probe", "dm-mixing", "dm-probe-update"):
        return "probe and mixing"
    return "other"


def _digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks dm_traffic")
    p.add_argument("--label", default="after", help="name of this measurement in the JSON (before, after ...)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--scan", type=int, default=32)
    p.add_argument("--detector", type=int, default=32)
    p.add_argument("--save", help="also save the final object, probe and costs here (.npz), to compare results")
    a = p.parse_args(argv)

    import dask
    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster
    from daskptycho.engines import engine_options
    from daskptycho.engines.dm import partition_positions
    try:
        from daskptycho.engines.dm import part_region
    except ImportError:  # the code before issue 16
        from daskptycho.engines.dm import _region as part_region
    from daskptycho.engines.problem import prepare

    parts, workers, modes = 4, 2, 2
    kw = dict(engine="dm", iterations=a.iterations, partitions=parts, probe_modes=modes, probe_refine_start=0)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "image.zarr")
        dp.write_dataset(dp.simulate(kind="image", scan=(a.scan, a.scan), detector=a.detector), store)
        ds = dp.open_dataset(store)
        problem = prepare(ds, engine_options(**kw))
        grid = tuple(problem.grid.shape)
        regions = [part_region(problem.corners[idx], problem.window) for idx in partition_positions(problem, parts)]
        # the previews of the live page are not part of the iteration's traffic
        with dask.config.set({"daskptycho.dashboard.live": False}), \
                local_cluster(workers, memory_limit=0) as cl, Client(cl) as c:
            c.wait_for_workers(workers)
            dp.reconstruct(ds, client=c, **{**kw, "iterations": 1})  # warm the workers (imports, FFT plans)
            c.run(_clear_logs)
            t0 = time.perf_counter()
            res = dp.reconstruct(ds, client=c, **kw)
            wall = time.perf_counter() - t0
            logs = c.run(_incoming)
    # one object mode: a crop is (1, h, w) complex64
    crop_bytes = [8 * (y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in regions]
    sums64 = [16 * n // 8 + 8 * n // 8 for n in crop_bytes]  # complex128 numerator + float64 denominator
    sums32 = [s // 2 for s in sums64]
    object_bytes = 8 * grid[0] * grid[1]
    full_grid_f64 = 16 * grid[0] * grid[1] + 8 * grid[0] * grid[1]

    per_it = defaultdict(lambda: defaultdict(int))
    per_role = defaultdict(lambda: defaultdict(int))
    largest = defaultdict(lambda: (0, None))
    other = defaultdict(int)
    for entries in logs.values():
        for _, keys in entries:
            for key, nbytes in keys.items():
                kind, it = _kind_and_iteration(key)
                nbytes = int(nbytes or 0)
                if it is None:
                    other[kind] += nbytes
                    continue
                per_it[int(it)][kind] += nbytes
                per_role[int(it)][_role(key)] += nbytes
                if nbytes > largest[int(it)][0]:
                    largest[int(it)] = (nbytes, kind)
    iterations = []
    for it in sorted(per_it):
        kinds = dict(sorted(per_it[it].items(), key=lambda kv: -kv[1]))
        iterations.append({"iteration": it, "bytes": sum(kinds.values()), "by_kind": kinds, "by_role": dict(per_role[it]),
                           "largest_message_bytes": largest[it][0], "largest_message_kind": largest[it][1]})
    roles = sorted({r for v in per_role.values() for r in v})
    by_role_mean = {r: float(np.mean([per_role[it].get(r, 0) for it in per_it])) for r in roles}
    total = [r["bytes"] for r in iterations]
    entry = {
        "dataset": f"image {a.scan}x{a.scan} positions, {a.detector} px patterns, {modes} probe modes",
        "options": kw, "workers": workers, "object_grid": list(grid), "part_regions": regions,
        "object_bytes_complex64": object_bytes, "full_grid_float64_message_bytes": full_grid_f64,
        "crops_bytes": sum(crop_bytes), "partial_sums_bytes_float64": sum(sums64), "partial_sums_bytes_float32": sum(sums32),
        "target_bytes_per_iteration": sum(crop_bytes) + sum(sums64),
        "bytes_per_iteration_mean": float(np.mean(total)) if total else 0.0,
        "bytes_per_iteration_by_role_mean": by_role_mean,
        "bytes_per_iteration_over_object": float(np.mean(total)) / object_bytes if total else 0.0,
        "largest_message_over_object": max((r["largest_message_bytes"] for r in iterations), default=0) / object_bytes,
        "iterations": iterations, "outside_iterations_by_kind": dict(other),
        "wall_s": wall, "wall_s_note": "the whole run (start, 3 iterations, final fetch) on a shared 2-core machine",
        "result_sha256": _digest(res.object.values, res.probe.values, res.cost.values),
        "costs": res.cost.values.tolist(),
    }
    if a.save:
        np.savez(a.save, object=res.object.values, probe=res.probe.values, cost=res.cost.values)
    print(json.dumps({k: v for k, v in entry.items() if k != "iterations"}, indent=1, default=str))
    for r in iterations:
        print(r)
    path = os.path.join(RESULTS, "dm_traffic.json")
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = {k: v for k, v in json.load(f).items() if k != "machine"}
    old[a.label] = entry
    print(f"wrote {write('dm_traffic', old)}")


if __name__ == "__main__":
    main()
