"""SHA-256 of the arrays each engine returns on fixed inputs: a refactoring that must not
change results compares these before and after (the CPU results are bit-reproducible).

    .venv/bin/python scripts/result_hashes.py > before.json
    ... change the code ...
    .venv/bin/python scripts/result_hashes.py > after.json && diff before.json after.json

Cases: the demo (pbtio3 16x16, 64 px, 4 slices, gd 2x2, 30 iterations), gd 3x3 with probe
refinement, hve 2x2, ml full batch and minibatch, dm with 2 probe modes; one 2-worker
LocalCluster for all of them.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile

import numpy as np


def digest(res):
    out = {}
    for name in ("object", "probe", "cost"):
        a = np.ascontiguousarray(res[name].values)
        out[name] = hashlib.sha256(a.tobytes()).hexdigest()[:16]
    return out


def main():
    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster

    cases = {
        "demo gd 2x2": dict(engine="gd", tiles=(2, 2), slices=4, iterations=30),
        "gd 3x3 refine": dict(engine="gd", tiles=(3, 3), slices=4, iterations=6, refine_probe=True, probe_refine_start=2),
        "hve 2x2": dict(engine="hve", tiles=(2, 2), slices=4, iterations=6),
        "ml full batch": dict(engine="ml", slices=4, iterations=6),
        "ml minibatch": dict(engine="ml", slices=4, iterations=6, batch_size=32, refine_probe=True),
        "dm 2 modes": dict(engine="dm", slices=1, iterations=8, probe_modes=2, partitions=2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/pbtio3.zarr"
        dp.write_dataset(dp.simulate(kind="pbtio3", scan=(16, 16), detector=64, slices=4), path)
        ds = dp.open_dataset(path)
        out = {}
        with local_cluster(2) as cluster, Client(cluster) as client:
            for name, kw in cases.items():
                out[name] = digest(dp.reconstruct(ds, client=client, **kw))
                print(name, out[name], file=sys.stderr)
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
