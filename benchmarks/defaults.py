"""The evidence behind the default update rule: minibatches, then full batch.

    python -m benchmarks defaults [--iterations 50] [--cases thin,thick,flyscan] [--quick]

Three cases from daskptycho's own simulator (20 x 20 scans, 64 px patterns; the
independent cases are ``python -m benchmarks independent``, docs/quality.md):

* ``thin``: PbTiO3, 200 keV, one 2 nm slice, 1e5 e/A^2 (Poisson noise), 1 slice;
* ``thick``: PbTiO3, 200 keV, 20 slices of 0.4 nm, 1e5 e/A^2, 20 slices;
* ``flyscan``: X-ray fly scan, 4 true incoherent modes (motion blur), the simulator's
  default dose (0.5 photons/A^2), 1 and 4 modes with probe refinement.

Each row runs ``ml`` (1 worker) or ``gd`` (2x2 tiles, 2 workers) for the same
iterations with one update rule and scores the object against the truth: the phase
NRMSE (RMS of the projected-phase error over the RMS of the true projected phase, both
mean-free, over the scanned field) and the complex NRMSE (per slice, after the best
constant phase: the phase-wrapped error the thick case needs), at the best whole-pixel
registration (:func:`daskptycho.metrics.registered_error`).

The rules compared: full batch (``batch_size=None``: the defaults before), minibatches
of several sizes throughout (``minibatch_fraction=1``), and minibatches for the first
share of the iterations then full batch (the default: ``batch_size="auto"``, 4 equal
minibatches, ``minibatch_fraction=0.7``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from .common import machine, write

CASES = {
    "thin": dict(kind="pbtio3", scan=(20, 20), slices=1, slice_thickness_m=2e-9, dose=1e5, detector=64),
    "thick": dict(kind="pbtio3", scan=(20, 20), slices=20, slice_thickness_m=4e-10, dose=1e5, detector=64),
    "flyscan": dict(kind="flyscan", scan=(20, 20), probe_modes=4, detector=64),
}

#: (label, reconstruct keywords) per case; "default" is the engine's defaults
RULES = {
    "thin": [("full batch (before)", dict(batch_size=None)), ("default", {}),
             ("4 minibatches throughout", dict(minibatch_fraction=1.0))],
    "thick": [("full batch (before)", dict(batch_size=None)), ("default", {}),
              ("4 minibatches throughout", dict(minibatch_fraction=1.0)),
              ("2 minibatches, then full batch", dict(batch_size=200)),
              ("7 minibatches, then full batch", dict(batch_size=64))],
    "flyscan": [("full batch (before), 4 modes", dict(batch_size=None, probe_modes=4, refine_probe=True)),
                ("default, 1 mode", dict(probe_modes=1, refine_probe=True)),
                ("default, 4 modes", dict(probe_modes=4, refine_probe=True))],
}


def phase_errors(obj, truth, position):
    """(phase NRMSE, complex NRMSE, Pearson r, (dy, dx)) of ``obj`` against ``truth`` at the
    best whole-pixel registration (see the module docstring)."""
    from daskptycho.metrics import _on_truth_grid, registered_error, scanned_region

    _, r, (dy, dx) = registered_error(obj, truth, position)
    d = float(truth.y[1] - truth.y[0])
    y0, x0 = float(truth.y[0]), float(truth.x[0])
    o = obj.assign_coords(y=y0 + np.rint((obj.y.values - y0) / d) * d + dy * d,
                          x=x0 + np.rint((obj.x.values - x0) / d) * d + dx * d)
    o, t = _on_truth_grid(o, truth, scanned_region(position))
    o, t = o.load().values, t.load().values
    a, b = np.angle(o).sum(0), np.angle(t).sum(0)
    a, b = a - a.mean(), b - b.mean()
    phase = float(np.sqrt(np.mean((a - b) ** 2)) / np.std(b))
    err = 0.0
    for s in range(o.shape[0]):
        c = np.angle(np.vdot(o[s], t[s]))  # the best constant phase of the slice
        err += np.linalg.norm(o[s] * np.exp(1j * c) - t[s]) ** 2 / np.linalg.norm(t[s] - t[s].mean()) ** 2
    return phase, float(np.sqrt(err / o.shape[0])), float(r), (int(dy), int(dx))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks defaults")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--cases", default="thin,thick,flyscan")
    p.add_argument("--quick", action="store_true", help="the default and full-batch rows only")
    a = p.parse_args(argv)

    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    rows = []
    with tempfile.TemporaryDirectory() as tmp, local_cluster(2, memory_limit=0) as cl, Client(cl) as c:
        for case in a.cases.split(","):
            store = os.path.join(tmp, f"{case}.zarr")
            sim = dict(CASES[case])
            dp.write_dataset(dp.simulate(**sim), store)
            ds = dp.open_dataset(store)
            pad = int(ds.attrs.get("recommended_pad_px", 0))
            for label, kw in RULES[case]:
                if a.quick and not (label.startswith("default") or "before" in label):
                    continue
                for engine in ("ml", "gd"):
                    opts = dict(iterations=a.iterations, slices=sim["slices"] if "slices" in sim else 1, pad_px=pad, **kw)
                    if engine == "gd":
                        opts["tiles"] = (2, 2)
                        if isinstance(opts.get("batch_size"), int):  # gd's batch is per tile: the same number of rounds
                            opts["batch_size"] = max(1, opts["batch_size"] // 4)
                    t0 = time.perf_counter()
                    res = dp.reconstruct(ds, engine=engine, client=c, **opts)
                    seconds = time.perf_counter() - t0
                    phase, cplx, r, shift = phase_errors(res.object, ds.truth_object, ds.position.values)
                    rows.append({"case": case, "rule": label, "engine": engine,
                                 "options": {k: v for k, v in opts.items() if k in kw},
                                 "phase_nrmse": phase, "complex_nrmse": cplx, "phase_pearson_r": r, "shift_px": shift,
                                 "seconds": seconds})
                    print(rows[-1], flush=True)
    write("defaults", {"machine": machine(), "command": "python -m benchmarks defaults " + " ".join(argv or []),
                       "iterations": a.iterations, "cases": {k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in CASES[k].items()}
                                                               for k in a.cases.split(",")},
                       "rows": rows})


if __name__ == "__main__":
    main()
