"""Scan-position correction in engines ml and gd: known random position errors, recovered.

    python -m benchmarks positions [--iterations 50] [--seeds 3] [--scan 16]

A noise-free X-ray scan of the test image (``simulate(kind="image")``: 64 px patterns, a
4 px step, ``--scan`` x ``--scan`` positions), its positions moved by Gaussian errors of
0.5, 1 and 2 px rms per coordinate (``--seeds`` draws each), reconstructed by ml (full
batch, ``--iterations``) without and with ``position_correction`` (defaults: from
iteration 5, every iteration, at most 3 px; the 2 px case also with
``position_max_shift_px=6``). Reported per case: the rms position error before and after
(over both coordinates, the common shift removed: it is free), the share recovered, the
object's mean error against the truth (``daskptycho.metrics.error_map``) and its phase
correlation at the best whole-pixel registration (the scan's translation is free, and
the grid of perturbed positions lies a fraction of a pixel off the truth's lattice), and
the time in this process (no cluster). Then the design's ablation at 1 px rms: without
the first refinement's whole-pixel search, and with the continuous mean shift removed
after every refinement (what Pty-Chi and PtychoShelves do by default).

Then engine gd (2x2 tiles, each refining its own positions on its own patch) on a 2-worker
LocalCluster at 1 px rms, the same draws: on the test image (whose probe-support halos
are whole windows), and on a narrow-probe scan of it (``semiangle_rad=2.5e-3``,
``defocus_m=20e-6``, ``halo_fraction=0.99``: windows reach past the tiles, where the
patch's edge values stand in) beside ml on the same draws; the first draw also with
``daskptycho.schedule.exchange: scheduler``, which must give the same bits as the default
peer exchange. gd's time is the whole ``reconstruct`` call on the cluster.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from .common import write

LEVELS = (0.5, 1.0, 2.0)


def _perturbed(ds, rms_px, seed):
    err = np.random.default_rng(seed).normal(0.0, rms_px, ds["position"].shape)
    bad = ds.copy()
    bad["position"] = ds["position"] + err * ds.attrs["pixel_size_m"]
    return bad


def _rms_px(position_m, truth_m, dx):
    from daskptycho.physics.positions import remove_mean_shift

    t = np.asarray(truth_m) / dx
    d = remove_mean_shift(np.asarray(position_m) / dx, t) - t
    return float(np.sqrt(np.mean(d ** 2)))


def _run(ds, bad, iterations, **kw):
    from daskptycho.engines import engine_options
    from daskptycho.engines.ml import positions_in_metres, run_ml_state
    from daskptycho.engines.problem import prepare, result_dataset
    from daskptycho.io.patterns import load_patterns

    problem = prepare(bad, engine_options(engine="ml", iterations=iterations, **kw))
    data = load_patterns(bad)
    t0 = time.perf_counter()
    state, costs = run_ml_state(problem, data)
    seconds = time.perf_counter() - t0
    res = result_dataset(problem, state["object"], state["probe"], costs, bad)
    from daskptycho.metrics import registered_error

    err, r, shift = registered_error(res["object"], ds["truth_object"], ds["position"].values)
    dx = ds.attrs["pixel_size_m"]
    out = {"seconds": seconds, "object_error": err, "phase_pearson_r": r, "registration_px": list(shift), "final_cost": costs[-1]}
    if "positions" in state:
        out["rms_after_px"] = _rms_px(positions_in_metres(problem, state["positions"]), ds["position"].values, dx)
    return out


def _run_gd(ds, bad, client, iterations, exchange=None, **kw):
    import dask

    import daskptycho as dp

    cfg = {"daskptycho.schedule.exchange": exchange} if exchange else {}
    t0 = time.perf_counter()
    with dask.config.set(cfg):
        res = dp.reconstruct(bad, engine="gd", tiles=(2, 2), iterations=iterations, client=client, **kw)
    seconds = time.perf_counter() - t0
    from daskptycho.metrics import registered_error

    err, r, shift = registered_error(res["object"], ds["truth_object"], ds["position"].values)
    out = {"seconds": seconds, "object_error": err, "phase_pearson_r": r, "registration_px": list(shift),
           "final_cost": float(res["cost"].values[-1]), "halo_px": list(res.attrs["halo_px"])}
    if "position_refined" in res:
        out["rms_after_px"] = _rms_px(res["position_refined"].values, ds["position"].values, ds.attrs["pixel_size_m"])
    return out, res


def _gd_rows(ds, a):
    """gd with and without correction at 1 px rms on the test image and a narrow-probe scan of it."""
    import hashlib

    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    def digest(res):
        return hashlib.sha256(b"".join(res[v].values.tobytes() for v in ("object", "probe", "cost", "position_refined"))).hexdigest()[:16]

    narrow = dp.simulate(kind="image", scan=(a.scan, a.scan), detector=64, max_angle_rad=7.75e-3, semiangle_rad=2.5e-3, defocus_m=20e-6)
    cases = (("image", ds, {}), ("narrow probe", narrow, {"halo_fraction": 0.99}))
    rows = []
    with local_cluster(2) as cluster, Client(cluster) as client:
        _run_gd(ds, ds, client, 2, position_correction=True, position_correction_start=0)  # warm the workers up
        for label, data, kw in cases:
            dx = data.attrs["pixel_size_m"]
            for seed in range(1, a.seeds + 1):
                bad = _perturbed(data, 1.0, seed)
                before = _rms_px(bad["position"].values, data["position"].values, dx)
                row = {"dataset": label, "rms_px": 1.0, "seed": seed, "rms_before_px": before, **kw}
                row["gd_off"], _ = _run_gd(data, bad, client, a.iterations, **kw)
                row["gd_on"], res = _run_gd(data, bad, client, a.iterations, position_correction=True, **kw)
                row["gd_on"]["recovered"] = 1 - row["gd_on"]["rms_after_px"] / before
                if label != "image":  # ml on the same draw (the image's are in the rows above)
                    row["ml_off"] = _run(data, bad, a.iterations)
                    row["ml_on"] = _run(data, bad, a.iterations, position_correction=True)
                    row["ml_on"]["recovered"] = 1 - row["ml_on"]["rms_after_px"] / before
                if seed == 1:
                    sched, other = _run_gd(data, bad, client, a.iterations, exchange="scheduler", position_correction=True, **kw)
                    row["scheduler_exchange_seconds"] = sched["seconds"]
                    row["scheduler_exchange_bit_identical"] = digest(other) == digest(res)
                rows.append(row)
                print({k: (v if not isinstance(v, dict) else {x: v[x] for x in ("object_error", "rms_after_px", "seconds") if x in v})
                       for k, v in row.items()}, flush=True)
    return rows


def _variant(name):
    """Replace ml's refinement by an ablated one (``None``: the shipped method); returns the undo."""
    import daskptycho.tasks.ml as tml
    from daskptycho.physics import positions as P

    shipped = tml.refine_ml_positions
    if name == "no search":
        def refine(obj, probe, kernel, data, mask, positions, it, problem):
            o = problem.options
            return P.refine_positions(obj, probe, kernel, data, positions, tml.start_positions(problem), mask, o.cost,
                                      o.position_max_shift_px, step=tml.POSITION_STEP, chunk=problem.chunk)
    elif name == "mean shift removed":
        def refine(obj, probe, kernel, data, mask, positions, it, problem):
            new = shipped(obj, probe, kernel, data, mask, positions, it, problem)
            return P.keep_on_object(P.remove_mean_shift(new, tml.start_positions(problem)), problem.window, problem.grid.shape)
    else:
        return lambda: None
    tml.refine_ml_positions = refine

    def undo():
        tml.refine_ml_positions = shipped
    return undo


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks positions")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--scan", type=int, default=16)
    a = p.parse_args(argv)

    import daskptycho as dp

    load0 = os.getloadavg()
    ds = dp.simulate(kind="image", scan=(a.scan, a.scan), detector=64)
    dx = ds.attrs["pixel_size_m"]
    rows = []
    for level in LEVELS:
        for seed in range(1, a.seeds + 1):
            bad = _perturbed(ds, level, seed)
            before = _rms_px(bad["position"].values, ds["position"].values, dx)
            row = {"rms_px": level, "seed": seed, "rms_before_px": before, "off": _run(ds, bad, a.iterations)}
            shifts = (3.0, 6.0) if level >= 2 else (3.0,)
            for m in shifts:
                on = _run(ds, bad, a.iterations, position_correction=True, position_max_shift_px=m)
                on["recovered"] = 1 - on["rms_after_px"] / before
                row[f"on_max_shift_{m:g}"] = on
            rows.append(row)
            print({k: (v if not isinstance(v, dict) else {x: v[x] for x in ("object_error", "rms_after_px", "seconds") if x in v})
                   for k, v in row.items()}, flush=True)
    ablation = []
    for name in ("shipped", "no search", "mean shift removed"):
        for seed in range(1, a.seeds + 1):
            bad = _perturbed(ds, 1.0, seed)
            before = _rms_px(bad["position"].values, ds["position"].values, dx)
            undo = _variant(name)
            try:
                on = _run(ds, bad, a.iterations, position_correction=True)
            finally:
                undo()
            ablation.append({"variant": name, "seed": seed, "rms_before_px": before, "rms_after_px": on["rms_after_px"],
                             "recovered": 1 - on["rms_after_px"] / before, "object_error": on["object_error"]})
            print(ablation[-1], flush=True)
    gd = _gd_rows(ds, a)
    path = write("positions", {
        "dataset": f"image {a.scan}x{a.scan}, 64 px patterns, 4 px step, noise-free; Gaussian position errors per coordinate",
        "iterations": a.iterations, "seeds": a.seeds, "rows": rows, "ablation": ablation, "gd": gd,
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "command": "python -m benchmarks positions " + " ".join(argv or [])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
