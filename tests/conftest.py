"""Shared fixtures: small simulated stores and an in-process LocalCluster."""

from __future__ import annotations

import ast
import functools
import threading

import hypothesis  # noqa: F401  now, not lazily from pytest's terminal summary while worker threads log
import pytest

import daskptycho as dp
from daskptycho.backend import gpu_available as _gpu_available


def _serialise_ast_parse():
    """One lock around ``ast.parse`` in the test process.

    CPython 3.11 keeps the AST constructor's recursion counter in module state that threads
    share, so two ``ast.parse`` calls in two threads can interleave (a garbage collection
    inside one runs Python code and lets the other thread in) and the first fails with
    "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905). Here the
    two are pytest rewriting a module imported lazily during a test (hypothesis's plugin
    imports hypothesis's modules as they are needed) and distributed's event-loop thread
    logging the traceback of a lost worker's broken connection (Python 3.11 draws a
    traceback's ^^^ markers with ``ast.parse``). Seen twice in the fault tests under load.
    ``make test`` also runs pytest with ``PYTHONNODEBUGRANGES=1`` (no ^^^ markers, so no
    parsing when a traceback is drawn), which covers what a lock cannot: a parse that a
    finalizer starts inside another parse on the same thread.
    """
    parse, lock = ast.parse, threading.RLock()

    @functools.wraps(parse)
    def parse_one_at_a_time(*args, **kwargs):
        with lock:
            return parse(*args, **kwargs)

    ast.parse = parse_one_at_a_time


_serialise_ast_parse()


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
