"""Every engine on the GPU (``device="gpu"``, and ``cluster="cuda"`` through dask-cuda),
each compared with the same run on the CPU; checkpoint/resume and a lost worker on the
GPU. All ``gpu``-marked: skipped cleanly without a usable GPU.

The GPU sums with atomics (no fixed order), so results agree with the CPU's to float32
rounding, not bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import dask
import numpy as np
import pytest

import daskptycho as dp

pytestmark = pytest.mark.gpu

CASES = {
    "ml": dict(engine="ml", slices=2),
    "ml-minibatch": dict(engine="ml", slices=2, batch_size=16),
    "gd": dict(engine="gd", tiles=(2, 2), slices=2, refine_probe=True, probe_refine_start=2),
    "gd-local": dict(engine="gd", tiles=(2, 2), slices=2, local_updates=True, batch_size=8, step=0.5),
    "hve": dict(engine="hve", tiles=(2, 2), slices=2),
    "dm": dict(engine="dm", slices=1, probe_modes=2, probe_refine_start=2, partitions=2),
}


@pytest.fixture(scope="module")
def gpu_client():
    """Two single-threaded worker processes sharing this machine's GPU."""
    from distributed import Client

    from daskptycho.cluster import local_cluster

    with local_cluster(2, memory_limit="8GiB") as cluster, Client(cluster) as c:
        yield c


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", list(CASES))
def test_engine_on_gpu_equals_cpu(small_pbtio3, client, gpu_client, case):
    ds = dp.open_dataset(small_pbtio3)
    kw = CASES[case]
    cpu = dp.reconstruct(ds, iterations=6, client=client, **kw)
    gpu = dp.reconstruct(ds, iterations=6, client=gpu_client, device="gpu", **kw)
    assert isinstance(gpu.object.values, np.ndarray) and isinstance(gpu.probe.values, np.ndarray)
    assert _rel(gpu.object.values, cpu.object.values) < 1e-4, case
    assert _rel(gpu.probe.values, cpu.probe.values) < 1e-4, case
    np.testing.assert_allclose(gpu.cost.values, cpu.cost.values, rtol=1e-4)
    mem = json.loads(gpu.attrs["memory"])
    assert mem  # the memory report is made on the GPU too


@pytest.mark.parametrize("engine", ["gd", "dm", "ml"])
def test_checkpoint_and_resume_on_gpu(small_pbtio3, gpu_client, tmp_path, engine):
    ds = dp.open_dataset(small_pbtio3)
    kw = CASES[engine]
    whole = dp.reconstruct(ds, iterations=6, client=gpu_client, device="gpu", **kw)
    out = str(tmp_path / "run.zarr")
    dp.reconstruct(ds, iterations=3, client=gpu_client, device="gpu", checkpoint=out, checkpoint_every=3, **kw)
    rest = dp.reconstruct(ds, iterations=6, client=gpu_client, device="gpu", checkpoint=out, resume=True, checkpoint_every=3, **kw)
    assert _rel(rest.object.values, whole.object.values) < 1e-4
    np.testing.assert_allclose(rest.cost.values, whole.cost.values, rtol=1e-4)


def test_lost_gpu_worker_recovers(small_pbtio3, gpu_client, tmp_path):
    ds = dp.open_dataset(small_pbtio3)
    kw = CASES["gd"]
    ref = dp.reconstruct(ds, iterations=8, client=gpu_client, device="gpu", **kw)
    gpu_client.wait_for_workers(2, timeout=60)
    pids = gpu_client.run(os.getpid)
    victim = sorted(pids)[-1]
    fired = []

    def progress(it, cost):
        if it == 4 and not fired:
            fired.append(victim)
            threading.Thread(target=os.kill, args=(pids[victim], signal.SIGKILL)).start()

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}):
        res = dp.reconstruct(ds, iterations=8, client=gpu_client, device="gpu", progress=progress,
                             checkpoint=str(tmp_path / "out.zarr"), checkpoint_every=2, **kw)
    assert fired == [victim]
    (rec,) = json.loads(res.attrs["recoveries"])
    assert rec["lost_workers"] == [victim]
    assert _rel(res.object.values, ref.object.values) < 1e-4


@pytest.mark.parametrize("engine", ["ml", "gd"])
def test_cuda_cluster_runs_on_the_gpu(small_pbtio3, engine):
    pytest.importorskip("dask_cuda")
    ds = dp.open_dataset(small_pbtio3)
    kw = CASES[engine]
    ref = dp.reconstruct(ds, iterations=4, workers=2 if engine == "gd" else 1, **kw)
    res = dp.reconstruct(ds, iterations=4, cluster="cuda", **kw)
    assert _rel(res.object.values, ref.object.values) < 1e-4
