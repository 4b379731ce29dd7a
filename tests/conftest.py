"""Shared fixtures: small simulated stores and an in-process LocalCluster."""

from __future__ import annotations

import pytest

import daskptycho as dp
from daskptycho.backend import gpu_available as _gpu_available


def pytest_collection_modifyitems(config, items):
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy (cupy.is_available() is False or CuPy is not installed)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_pbtio3(tmp_path_factory):
    """A small noise-free PbTiO3 store (8x8 positions, 32 px patterns, 2 slices)."""
    path = tmp_path_factory.mktemp("data") / "pbtio3.zarr"
    ds = dp.simulate(kind="pbtio3", scan=(8, 8), detector=32, slices=2, max_angle_rad=60e-3, defocus_m=60e-10)
    dp.write_dataset(ds, path)
    return path


@pytest.fixture(scope="module")
def client():
    """A real LocalCluster with 2 single-threaded worker processes, loopback only."""
    from distributed import Client

    from daskptycho.cluster import local_cluster

    with local_cluster(2, memory_limit="2GiB") as cluster, Client(cluster) as c:
        yield c
