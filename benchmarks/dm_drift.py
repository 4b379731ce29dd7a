"""dm on noisy fly scans over 100 iterations: the error against the truth per iteration,
for both view updates (``view_update="raar"`` and the paper's eq. 3, ``"dm"``) and 1
and 4 probe modes.

    python -m benchmarks dm_drift [--iterations 10,20,40,60,100] [--low-dose-iterations 40,100]

The fly scan of ``benchmarks/flyscan_modes.py`` (16x16 positions, 64 px patterns,
motion over one 10 px step per exposure, 5 sub-positions, Poisson noise at the default
dose of 0.5 photons/A^2), and the same scan at a fifth of the dose (0.1 photons/A^2, at
fewer iterations), 2 parts on a 2-worker LocalCluster. The state at iteration n is that
of a run of n iterations (nothing in a run depends on its length), so each iteration
count is one run.

Reported per run: the mean error against the truth over the scanned field
(``daskptycho.metrics.error_map``: after the best constant phase), the same after the
best complex scale (the object/probe scale is not measured by the data: this column
shows whether a change of the error is the scale's), the phase correlation, the Fourier
error of the model entering the last iteration and the probe power fractions. A
variant *drifts* where its error at the last iteration is above its error at
iteration 40.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from .common import write

VARIANTS = ("raar", "dm")
MODES = (1, 4)


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def scale_fitted_error(obj, truth, position):
    """Mean ``|c O - T|`` over the scanned field, ``c`` the least-squares complex scale
    (the object's scale against the probe's is free), on the truth's pixels (1 slice).

    Parameters
    ----------
    obj, truth : xarray.DataArray (slice, y, x), complex, coordinates in metres
    position : (J, 2) scan positions (m)
    """
    from daskptycho.metrics import scanned_region

    y0, y1, x0, x1 = scanned_region(position)
    dx = float(truth["y"][1] - truth["y"][0])
    t = truth.sel(y=slice(y0 - dx / 2, y1 + dx / 2), x=slice(x0 - dx / 2, x1 + dx / 2))
    o = obj.sel(y=t["y"], x=t["x"], method="nearest", tolerance=dx / 10)
    o, t = o.values[0].astype(np.complex128), t.values[0].astype(np.complex128)
    c = np.vdot(o, t) / np.vdot(o, o)
    return float(np.abs(c * o - t).mean())


def _case(c, ds, label, iterations):
    from daskptycho import reconstruct
    from daskptycho.metrics import error_map, phase_correlation

    pad = int(ds.attrs["recommended_pad_px"])
    rows = []
    for variant in VARIANTS:
        for m in MODES:
            for n in iterations:
                t0 = time.perf_counter()
                res = reconstruct(ds, engine="dm", iterations=n, probe_modes=m, view_update=variant, pad_px=pad, partitions=2, client=c)
                r, _ = phase_correlation(res.object, ds.truth_object, ds.position.values)
                rows.append({"dataset": label, "view_update": variant, "probe_modes": m, "iterations": n,
                             "error_vs_truth": float(error_map(res.object, ds.truth_object, ds.position.values).mean()),
                             "error_after_scale": scale_fitted_error(res.object, ds.truth_object, ds.position.values),
                             "phase_pearson_r": r, "fourier_error_final": float(res.cost.values[-1]),
                             "power_fractions": res.probe_power_fraction.values.tolist(), "seconds": time.perf_counter() - t0})
                print({k: v for k, v in rows[-1].items() if k != "power_fractions"}, flush=True)
    return rows


def summarise(rows):
    """Per dataset, view update and modes: the error at iteration 40 and at the last, and
    whether it drifts (last > 40); per dataset and view update, whether 4 modes beat 1 at
    the last iteration."""
    out = []
    for label in dict.fromkeys(r["dataset"] for r in rows):
        for variant in VARIANTS:
            last = {}
            for m in MODES:
                mine = sorted((r for r in rows if r["dataset"] == label and r["view_update"] == variant and r["probe_modes"] == m),
                              key=lambda r: r["iterations"])
                at = {r["iterations"]: r["error_vs_truth"] for r in mine}
                last[m] = mine[-1]["error_vs_truth"]
                out.append({"dataset": label, "view_update": variant, "probe_modes": m, "error_at_40": at.get(40),
                            "last_iteration": mine[-1]["iterations"], "error_at_last": last[m],
                            "drifts": 40 in at and last[m] > at[40]})
            out.append({"dataset": label, "view_update": variant, "four_modes_beat_one": last[4] < last[1]})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks dm_drift")
    p.add_argument("--iterations", type=_ints, default=[10, 20, 40, 60, 100], help="iteration counts at the default dose")
    p.add_argument("--low-dose-iterations", type=_ints, default=[40, 100], help="iteration counts at 0.1 photons/A^2 (empty: skip)")
    a = p.parse_args(argv)

    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, local_cluster(2) as cl, Client(cl) as c:
        for label, dose, iterations in (("default dose (0.5 photons/A^2)", "default", a.iterations),
                                        ("low dose (0.1 photons/A^2)", 0.1, a.low_dose_iterations)):
            if not iterations:
                continue
            store = os.path.join(tmp, f"fly-{dose}.zarr")
            dp.write_dataset(dp.simulate(kind="flyscan", scan=(16, 16), detector=64, dose=dose), store)
            rows += _case(c, dp.open_dataset(store), label, iterations)
    path = write("dm_drift", {"dataset": "flyscan 16x16, 64 px, 5 sub-positions over a 10 px step, seed 0",
                              "partitions": 2, "workers": 2, "rows": rows, "summary": summarise(rows),
                              "seconds": time.perf_counter() - t0, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                              "command": "python -m benchmarks dm_drift " + " ".join(argv or [])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
