"""Data larger than a worker's memory: a store bigger than each worker's memory limit
is reconstructed by ``gd`` with every tile's patterns read from Zarr on the worker
that owns the tile, without spilling, pausing, restarting or killing a worker.

The patterns are not physical (a probe's far field times random gain, positive and
finite): this is a memory test, and the reconstruction only has to run.
"""

from __future__ import annotations

import json
import os

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import daskptycho as dp
from daskptycho import physics
from daskptycho.io.store import build_dataset

N = 128                      # detector pixels per side: 64 KiB per float32 pattern
# 138x138 = 19044 patterns: 1.25 GB of intensities (DASKPTYCHO_BIGDATA_SCAN=RxC for a larger run)
SCAN = tuple(int(v) for v in os.environ.get("DASKPTYCHO_BIGDATA_SCAN", "138x138").split("x"))
STEP_PX = 8                  # scan step in object pixels
WORKERS = 4
# per worker, below the store's size (DASKPTYCHO_BIGDATA_LIMIT=bytes)
# (a worker's fixed cost is ~400 MB: Python and the libraries ~190 MB, the compiled
# kernels' LLVM runtime ~135 MB, transients; distributed spills at 70% of the limit)
MEMORY_LIMIT = int(os.environ.get("DASKPTYCHO_BIGDATA_LIMIT", 1200 * 10**6))
TILES = (2, 2)               # one tile per worker


def _patterns(block, seed_base, far):
    """Random positive patterns for one chunk: the probe's far field times a gain."""
    rng = np.random.default_rng(seed_base + int(block.shape[0]) * 7919 + int(block.sum()))
    gain = rng.random((block.shape[0], N, N), dtype=np.float32) + np.float32(0.5)
    return far[None] * gain


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A store of SCAN patterns written chunk by chunk (the test process never holds it)."""
    dx, energy = 2e-11, 200e3
    lam = physics.electron_wavelength(energy)
    probe = physics.aperture_probe((N, N), dx, lam, 20e-3, 5e-9, 0.0)
    far = np.fft.fftshift(np.abs(np.fft.fft2(probe, norm="ortho")) ** 2).astype(np.float32)
    j = SCAN[0] * SCAN[1]
    yy, xx = np.meshgrid(np.arange(SCAN[0]), np.arange(SCAN[1]), indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64) * STEP_PX * dx
    small = build_dataset(np.zeros((1, N, N), np.float32), pos[:1], radiation="electron", energy_eV=energy, wavelength_m=lam,
                          pixel_size_m=dx, attrs={"probe_semiangle_rad": 20e-3, "probe_defocus_m": 5e-9})
    chunk = 64  # 4 MiB chunks, as write_dataset picks for 64 KiB patterns
    index = da.arange(j, chunks=chunk, dtype=np.float32)[:, None, None] * da.ones((1, N, N), chunks=(1, N, N), dtype=np.float32)
    inten = index.map_blocks(_patterns, 12345, far, dtype=np.float32)
    ds = xr.Dataset(
        {"intensity": (("scan", "ky", "kx"), inten, dict(small["intensity"].attrs)),
         "position": (("scan", "yx"), pos, dict(small["position"].attrs))},
        coords={"scan": np.arange(j), "yx": small["yx"].values, "ky": small["ky"].values, "kx": small["kx"].values},
        attrs=dict(small.attrs),
    )
    ds["ky"].attrs["units"] = ds["kx"].attrs["units"] = "1/m"
    path = tmp_path_factory.mktemp("big") / "big.zarr"
    with dask.config.set(scheduler="threads"):  # written here, before any cluster exists
        dp.write_dataset(ds, path, scan_chunk=chunk)
    return path, j * N * N * 4


def _worker_state(dask_worker):
    """What each worker can tell about its memory: spills, status, process id."""
    data = dask_worker.data
    metrics = getattr(data, "cumulative_metrics", {})
    spilled = getattr(data, "spilled_total", None)
    return {
        "pid": os.getpid(),
        "status": dask_worker.status.name,
        "disk_writes": int(metrics.get(("disk-write", "count"), 0)),
        "spilled_bytes_now": int(spilled.memory) if spilled is not None else 0,
        "memory_limit": dask_worker.memory_manager.memory_limit,
    }


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_store_larger_than_worker_memory_reconstructs_without_spilling(big_store, tmp_path):
    from distributed import Client

    from daskptycho.cluster import local_cluster

    path, nbytes = big_store
    assert nbytes > MEMORY_LIMIT  # the point of the test: no worker could hold the data
    ds = dp.open_dataset(path)   # the value scan streams the store chunk by chunk
    assert ds["intensity"].nbytes == nbytes
    with local_cluster(WORKERS, memory_limit=MEMORY_LIMIT) as cluster, Client(cluster) as client:
        before = client.run(_worker_state)
        assert all(s["memory_limit"] == MEMORY_LIMIT for s in before.values())
        import psutil

        tracked = _reset_peak()
        client_base = psutil.Process().memory_info().rss
        # a smaller working set per vectorised call (the knob for transient memory) keeps
        # the tile's patterns plus transients well under the spill threshold (70% of the limit)
        res = dp.reconstruct(ds, engine="gd", tiles=TILES, iterations=2, working_set_mib=8, client=client)
        client_peak = _peak_rss() if tracked else None
        after = client.run(_worker_state)

    mem = json.loads(res.attrs["memory"])
    peaks = mem["worker_peak_rss_bytes"]
    report = {"store_bytes": nbytes, "memory_limit_bytes": MEMORY_LIMIT, "workers": WORKERS, "tiles": list(TILES),
              "worker_peak_rss_bytes": peaks, "worker_peak_above_baseline_bytes": mem["worker_peak_above_baseline_bytes"],
              "tile_pattern_bytes": mem["tile_bytes"], "client_peak_rss_growth_bytes": None if client_peak is None else client_peak - client_base}
    out = os.environ.get("DASKPTYCHO_BIGDATA_REPORT")
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({**report, "worker_state": after}))

    # finished, with finite costs
    assert res.sizes["iteration"] == 2 and np.isfinite(res["cost"].values).all()
    # no worker restarted or killed: the same workers, the same processes
    assert set(after) == set(before)
    assert {w: s["pid"] for w, s in after.items()} == {w: s["pid"] for w, s in before.items()}
    # no worker spilled to disk or paused
    for w, s in after.items():
        assert s["disk_writes"] == 0 and s["spilled_bytes_now"] == 0, (w, s)
        assert s["status"] == "running", (w, s)
    # each worker's peak resident memory stayed below its limit, and each held about
    # its tile's share of the patterns (the data were split, not gathered)
    assert len(peaks) == WORKERS
    for w, peak in peaks.items():
        assert peak < MEMORY_LIMIT, (w, peak)
    held = [t["patterns"] for t in mem["tile_bytes"].values()]
    assert sum(held) == nbytes and max(held) < nbytes / 2
    # the client process never held the patterns either (its peak grew by far less)
    if client_peak is not None:
        assert client_peak - client_base < nbytes / 4, (client_peak, client_base)
