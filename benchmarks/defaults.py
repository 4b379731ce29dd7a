"""The evidence behind the default update rule: minibatches, then full batch.

    python -m benchmarks defaults [--iterations 50] [--cases thin,thick,flyscan] [--quick]

Three cases from daskptycho's own simulator (20 x 20 scans, 64 px patterns; the
independent cases are ``python -m benchmarks independent``, docs/quality.md):

* ``thin``: PbTiO3, 200 keV, one 2 nm slice, 1e5 e/A^2 (Poisson noise), 1 slice;
* ``thick``: PbTiO3, 200 keV, 20 slices of 0.4 nm, 1e5 e/A^2, 20 slices;
* ``flyscan``: X-ray fly scan, 4 true incoherent modes (motion blur), the simulator's
  default dose (0.5 photons/A^2), 1 and 4 modes with probe refinement.

Each row runs ``ml`` or ``gd`` (2x2 tiles; both on a 2-worker LocalCluster) for the same
iterations with one update rule and scores the object against the truth with the
independent benchmark's scorer (:func:`benchmarks.independent.score_object`: phase NRMSE
of the projected phase, unwrapped and wrapped, and the complex error of the projected
transmission, at the best whole-pixel registration).

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

from .common import machine, write
from .independent import score_object

CASES = {
    "thin": dict(kind="pbtio3", scan=(20, 20), slices=1, slice_thickness_m=2e-9, dose=1e5, detector=64),
    "thick": dict(kind="pbtio3", scan=(20, 20), slices=20, slice_thickness_m=4e-10, dose=1e5, detector=64),
    "flyscan": dict(kind="flyscan", scan=(20, 20), probe_modes=4, detector=64),
}

#: (label, reconstruct keywords) per case; "default" is the engine's defaults
RULES = {
    "thin": [("full batch", dict(batch_size=None)), ("default", {}),
             ("4 minibatches throughout", dict(minibatch_fraction=1.0))],
    "thick": [("full batch", dict(batch_size=None)), ("default", {}),
              ("4 minibatches throughout", dict(minibatch_fraction=1.0)),
              ("2 minibatches, then full batch", dict(batch_size=200)),
              ("7 minibatches, then full batch", dict(batch_size=64))],
    "flyscan": [("full batch, 4 modes", dict(batch_size=None, probe_modes=4, refine_probe=True)),
                ("default, 1 mode", dict(probe_modes=1, refine_probe=True)),
                ("default, 4 modes", dict(probe_modes=4, refine_probe=True))],
}


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
                    rows.append({"case": case, "rule": label, "engine": engine,
                                 "options": {k: v for k, v in opts.items() if k in kw},
                                 **score_object(res.object, ds.truth_object, ds.position.values), "seconds": seconds})
                    print(rows[-1], flush=True)
    write("defaults", {"machine": machine(), "command": "python -m benchmarks defaults " + " ".join(argv or []),
                       "iterations": a.iterations, "cases": {k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in CASES[k].items()}
                                                               for k in a.cases.split(",")},
                       "rows": rows})


if __name__ == "__main__":
    main()
