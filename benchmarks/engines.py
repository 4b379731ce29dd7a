"""Time per iteration, peak memory per worker and Dask overhead of every engine, on one dataset.

    python -m benchmarks engines [--scan 32 --detector 128 --slices 4 --iterations 12 --repeats 3]

The dataset of :mod:`benchmarks.fft_floor` (simulated PbTiO3, 32x32 positions,
128 px patterns, 4 slices; ``dm`` gets the single-slice dataset of the same size),
written to a Zarr store that the workers read themselves. Each case runs on a fresh
process LocalCluster (one thread per worker, 2 workers unless said), so each worker's
peak memory belongs to that run:

* ``ml`` (one task holds everything), ``gd`` with 1, 4, 9 and 16 tiles, ``hve`` with
  4 tiles, ``dm`` (2 parts) on 2 workers, and ``gd`` with 4 tiles on 1 worker;
* time per iteration (``s_per_iteration``): the steady-state mean of one run, the wall time
  between the arrivals of two iterations' costs at the client over the iterations between,
  from the end of the first group of costs that reached the client together
  (:func:`arrival_groups`: with peer blocks, of :data:`BLOCK` iterations here, a block's;
  otherwise one or a pipelined pair) from the 2nd on, to the last (:func:`daskptycho.metrics.steady_iteration_s`; with one
  iteration kept in flight the costs arrive in bursts, so single intervals' median is not
  a rate); each
  case runs ``--repeats`` times, the rounds interleaved (every case once, then again), and
  the table gives the median over runs with the range;
* each target's ratio is formed within each round from two rows run back to back, and the
  median of those ratios is reported (the machine's speed drifts between rounds);
* peak resident memory above the worker's baseline (the result's ``memory`` attribute);
* from the task stream (:func:`distributed.get_task_stream`), after the first iteration: the seconds workers spent
  computing and transferring, and the rest of ``workers x wall`` (scheduler latency,
  waiting on dependencies, the client's own work between iterations);
* the FFT floor of one iteration (FFTs counted on this dataset x the best measured time
  per FFT from ``benchmarks/results/fft_floor.json``) divided by the measured time.

Targets (issue 6): ``ml`` at least 40% of the floor; ``gd`` 1 tile at most 15% slower
than ``ml``; ``gd`` 4 tiles at least 1.6x faster on 2 workers than on 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from daskptycho.metrics import BURST_GAP, steady_iteration_s, steady_span

from .common import RESULTS, write
from .fft_floor import us_per_fft_now

#: iterations left out of each run's steady-state time (the start, and the burst of the first two costs)
SKIP = 2

#: the shortest wait (a fraction of a run's mean time per iteration, start included) between
#: the costs of two groups (:func:`arrival_groups`; a group's own come milliseconds apart):
#: the library's, with which :func:`~daskptycho.metrics.steady_span` passes over a run's
#: block ends that were fetched together
GROUP_GAP = BURST_GAP

#: iterations per peer block here (``daskptycho.schedule.block_iterations``; the default 16
#: would make a 12-iteration run one block, whose costs all arrive at once: no steady state)
BLOCK = 4

CASES = [
    # (label, engine, tiles, workers, multislice); each target's pair of rows runs back to back
    ("ml", "ml", (1, 1), 2, True),
    ("gd 1 tile", "gd", (1, 1), 2, True),
    ("gd 4 tiles", "gd", (2, 2), 2, True),
    ("gd 4 tiles on 1 worker", "gd", (2, 2), 1, True),
    ("gd 9 tiles", "gd", (3, 3), 2, True),
    ("gd 16 tiles", "gd", (4, 4), 2, True),
    ("hve 4 tiles", "hve", (2, 2), 2, True),
    ("dm (single slice)", "dm", (1, 1), 2, False),
]

#: (name, numerator row, denominator row, how the value is formed, requirement)
TARGETS = [
    ("ml_floor_fraction", "ml", None, "floor / s", ">= 0.40"),
    ("gd1_over_ml", "gd 1 tile", "ml", "a / b - 1", "<= 0.15"),
    ("gd4_speedup_2_vs_1_worker", "gd 4 tiles on 1 worker", "gd 4 tiles", "a / b", ">= 1.6"),
]


def _task_stream_summary(records, n_workers, t_begin, t_end):
    """Seconds of compute, transfer and other actions in the task stream between
    ``t_begin`` and ``t_end`` (wall clock, seconds since the epoch; parts of actions
    outside the window are cut off)."""
    sums = {}
    n = 0
    for r in records:
        counted = False
        for ss in r.get("startstops", ()):
            d = min(ss["stop"], t_end) - max(ss["start"], t_begin)
            if d > 0:
                sums[ss["action"]] = sums.get(ss["action"], 0.0) + d
                counted = True
        n += counted
    wall = t_end - t_begin
    compute = sums.get("compute", 0.0)
    transfer = sums.get("transfer", 0.0)
    return {
        "tasks": n,
        "compute_s": compute,
        "transfer_s": transfer,
        "other_actions_s": {k: v for k, v in sums.items() if k not in ("compute", "transfer")},
        "wall_s": wall,
        "worker_seconds": n_workers * wall,
        "idle_s": max(0.0, n_workers * wall - compute - transfer),
        "compute_fraction_of_worker_seconds": compute / (n_workers * wall) if wall else None,
    }


def run_case(store, engine, tiles, workers, iterations, slices, extra=None, device="cpu"):
    """One reconstruction on a fresh LocalCluster; returns timings, memory and the task stream summary."""
    import dask
    from distributed import Client, get_task_stream

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    stamps, epoch = [], []

    def progress(it, cost):
        stamps.append(time.perf_counter())
        epoch.append(time.time())

    kw = dict(iterations=iterations, slices=slices, device=device, **(extra or {}))
    if engine in ("gd", "hve"):
        kw["tiles"] = tiles
    with dask.config.set({"daskptycho.schedule.block_iterations": BLOCK}), local_cluster(workers, memory_limit=0) as cl, \
            Client(cl) as c:
        c.wait_for_workers(workers)
        t0 = time.perf_counter()
        with get_task_stream(client=c) as ts:
            res = dp.reconstruct(store, engine=engine, client=c, progress=progress, **kw)
        wall = time.perf_counter() - t0
        records = ts.data
    edges = [t0] + stamps
    per_it = [b - a for a, b in zip(edges[:-1], edges[1:])]
    # costs that reach the client together (a peer block's; on 1 worker the client may
    # fetch several blocks' at once): the steady span starts where such a group ends
    ends = arrival_groups(per_it)
    span = steady_span(per_it, SKIP, ends)
    mem = json.loads(res.attrs["memory"])
    peaks = list(mem.get("worker_peak_above_baseline_bytes", {}).values())
    return {
        "iteration_s": per_it,
        "iteration_s_median": statistics.median(per_it[1:] or per_it),
        "s_per_iteration": steady_iteration_s(per_it, SKIP, ends),
        "steady_span": list(span) if span else None,
        "wall_s": wall,
        "peak_above_baseline_bytes_max": int(max(peaks)) if peaks else None,
        "final_cost": float(res.cost.values[-1]),
        # steady state: the iterations that s_per_iteration averages
        "task_stream": _task_stream_summary(records, workers, epoch[span[0] if span else SKIP - 1], epoch[-1]),
    }


def arrival_groups(per_it, gap=GROUP_GAP):
    """The iterations whose costs end a group that reached the client together: ``k`` where
    the next cost came more than ``gap`` of the run's mean time per iteration later, and the
    last. Measured from the arrivals themselves, not from the run's ``peer_block_ends``:
    a client busy building graphs can fetch several blocks' costs at once."""
    mean = sum(per_it) / len(per_it)
    return [k for k in range(len(per_it)) if k == len(per_it) - 1 or per_it[k + 1] > gap * mean]


def dataset_ffts(ds, slices, engine="ml"):
    """FFTs of one iteration on ``ds`` (counted by instrumenting the FFT calls in this process)."""
    from .fft_floor import count_ffts, iteration_fft_count

    if engine != "dm":
        return iteration_fft_count(ds, slices)
    # dm: one iteration is the Fourier error and the Fourier projection of every view
    # (the object/probe sums have no FFT); counted on the same physics calls
    import numpy as np

    from daskptycho import physics
    from daskptycho.engines import engine_options
    from daskptycho.engines.problem import prepare
    from daskptycho.io.patterns import load_patterns
    from daskptycho.physics import dm

    p = prepare(ds, engine_options(dict(engine="dm", slices=1, iterations=1)))
    data = load_patterns(ds)
    obj = p.initial_object(np)[:1]
    probe = p.probe
    with count_ffts() as tally:
        for s in range(0, p.n_positions, 64):
            idx = physics.window_index(p.corners[s:s + 64], p.window, obj.shape[-2:])
            views = dm.exit_waves(probe, obj, idx)
            dm.fourier_error(probe, obj, idx, data[s:s + 64])
            dm.dm_update_views(views, probe, obj, idx, data[s:s + 64])
    tally["positions"] = int(p.n_positions)
    return tally


def _target_value(kind, a, b, floor):
    if kind == "floor / s":
        return floor / a["s_per_iteration"] if floor else None
    if kind == "a / b - 1":
        return a["s_per_iteration"] / b["s_per_iteration"] - 1
    return a["s_per_iteration"] / b["s_per_iteration"]


def _met(value, requirement):
    op, bound = requirement.split()
    return value is not None and (value >= float(bound) if op == ">=" else value <= float(bound))


def combine_runs(runs):
    """One row from a case's repeated runs: medians over runs (and the range of the time per iteration)."""
    med = statistics.median
    row = dict(runs[len(runs) // 2])  # fields that do not vary (label, counts, final cost)
    times = [r["s_per_iteration"] for r in runs]
    row.update({
        "runs": len(runs),
        "s_per_iteration": med(times), "s_per_iteration_runs": times, "s_per_iteration_range": [min(times), max(times)],
        "iteration_s_median": med(r["iteration_s_median"] for r in runs),
        "peak_above_baseline_bytes_max": max((r["peak_above_baseline_bytes_max"] or 0) for r in runs) or None,
        "us_per_fft_before_case": med(r["us_per_fft_before_case"] for r in runs),
        "task_stream": {k: med(r["task_stream"][k] for r in runs) for k in
                        ("tasks", "compute_s", "transfer_s", "wall_s", "worker_seconds", "idle_s")},
    })
    span = runs[0].get("steady_span")
    n = span[1] - span[0] if span else len(runs[0]["iteration_s"]) - SKIP
    row["task_stream"]["per_iteration"] = {k: row["task_stream"][k] / max(1, n) for k in ("compute_s", "transfer_s", "idle_s")}
    return row


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks engines")
    p.add_argument("--scan", type=int, default=32)
    p.add_argument("--detector", type=int, default=128)
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="runs of every case, interleaved (median reported)")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--out", default="engines", help="result name: benchmarks/results/NAME.json")
    p.add_argument("--cases", default="", help="labels to run, separated by semicolons (default: all)")
    a = p.parse_args(argv)
    if a.iterations <= SKIP + 1:
        p.error(f"--iterations must be more than {SKIP + 1} (the first {SKIP} are left out of the steady state)")
    if a.repeats < 1:
        p.error("--repeats must be >= 1")

    import dask

    import daskptycho as dp

    load0 = os.getloadavg()
    floor_path = os.path.join(RESULTS, "fft_floor.json")
    best_us = None
    if os.path.exists(floor_path):
        with open(floor_path) as f:
            best_us = json.load(f)["best_us_per_fft_cpu"].get(str(a.detector))
    wanted = [c.strip() for c in a.cases.split(";") if c.strip()]
    cases = [c for c in CASES if not wanted or c[0] in wanted]
    runs = {c[0]: [] for c in cases}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for multi in (True, False):
            cfg = dict(kind="pbtio3", scan=(a.scan, a.scan), detector=a.detector, slices=a.slices if multi else 1)
            ds = dp.simulate(**cfg)
            path = os.path.join(tmp, f"pbtio3_{'multi' if multi else 'single'}.zarr")
            dp.write_dataset(ds, path)
            stores[multi] = (path, cfg, ds)
        ffts = {"ml": dataset_ffts(stores[True][2], a.slices), "dm": dataset_ffts(stores[False][2], 1, "dm")}
        for rnd in range(a.repeats):
            for label, engine, tiles, workers, multi in cases:
                if any(f["label"] == label for f in failed):
                    continue
                path, cfg, _ = stores[multi]
                us_now = us_per_fft_now(a.detector)
                try:
                    r = run_case(path, engine, tiles, workers, a.iterations, cfg["slices"], device=a.device)
                except Exception as e:  # noqa: BLE001 - one failing engine must not lose the other rows
                    print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
                    failed.append({"label": label, "error": f"{type(e).__name__}: {e}"})
                    continue
                count = ffts["dm" if engine == "dm" else "ml"]["ffts"]
                exchange = dask.config.get("daskptycho.schedule.exchange", "peer") if engine in ("gd", "hve") and workers > 1 else None
                r.update({"label": label, "engine": engine, "tiles": tiles[0] * tiles[1], "workers": workers, "exchange": exchange,
                          "slices": cfg["slices"], "ffts_per_iteration": count, "round": rnd,
                          "us_per_fft_before_case": us_now, "loadavg_after": os.getloadavg()})
                runs[label].append(r)
                ts = r["task_stream"]
                print(f"[{rnd + 1}/{a.repeats}] {label:22s} {r['s_per_iteration']:7.3f} s/it (median interval {r['iteration_s_median']:.3f})  "
                      f"FFT now {us_now:.1f} us  peak {(r['peak_above_baseline_bytes_max'] or 0) / 2**20:7.1f} MiB  "
                      f"compute {ts['compute_s']:.1f} s transfer {ts['transfer_s']:.2f} s idle {ts['idle_s']:.1f} s of {ts['worker_seconds']:.1f}",
                      flush=True)
    rows = []
    for label, *_ in cases:
        if not runs[label]:
            continue
        r = combine_runs(runs[label])
        count = r["ffts_per_iteration"]
        floor = count * best_us * 1e-6 if best_us else None
        r.update({"floor_s": floor, "floor_fraction": floor / r["s_per_iteration"] if floor else None,
                  # the same floor from the FFT time measured just before each run (median over runs)
                  "floor_now_s": count * r["us_per_fft_before_case"] * 1e-6,
                  "floor_now_fraction": count * r["us_per_fft_before_case"] * 1e-6 / r["s_per_iteration"]})
        for k in ("round", "iteration_s"):
            r.pop(k, None)
        r["iteration_s_runs"] = [x["iteration_s"] for x in runs[label]]
        rows.append(r)
    targets = {}
    for name, num, den, kind, req in TARGETS:
        if num not in runs or not runs[num] or (den and (den not in runs or not runs[den])):
            continue
        floor = runs[num][0]["ffts_per_iteration"] * best_us * 1e-6 if best_us else None
        if den is None:
            per_round = [_target_value(kind, x, None, floor) for x in runs[num]]
        else:
            by_round = {x["round"]: x for x in runs[den]}
            per_round = [_target_value(kind, x, by_round[x["round"]], floor) for x in runs[num] if x["round"] in by_round]
        per_round = [v for v in per_round if v is not None]
        if not per_round:
            continue
        v = statistics.median(per_round)
        targets[name] = {"value": v, "target": req, "met": _met(v, req), "per_round": per_round,
                         "rounds_met": sum(_met(x, req) for x in per_round)}
    for k, t in targets.items():
        print(f"target {k}: {t['value']:.3f} ({t['target']}): {'met' if t['met'] else 'MISSED'}  "
              f"(per round {', '.join(f'{x:.3f}' for x in t['per_round'])})")
    out = write(a.out, {
        "device": a.device,
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "dataset": f"pbtio3 {a.scan}x{a.scan} positions, {a.detector} px patterns, {a.slices} slices (dm: 1 slice)",
        "scan": a.scan, "detector": a.detector, "slices": a.slices,
        "iterations": a.iterations, "repeats": a.repeats, "skip": SKIP, "block_iterations": BLOCK, "best_us_per_fft": best_us,
        "message_interval": str(dask.config.get("daskptycho.cluster.message-interval", "auto")),
        "fft_count": {k: {kk: vv for kk, vv in v.items() if kk != "by_size"} for k, v in ffts.items()},
        "rows": rows, "failed": failed, "targets": targets,
        "command": "python -m benchmarks engines " + " ".join(argv or []),
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
