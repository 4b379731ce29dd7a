"""Starting or connecting to a Dask cluster.

Safe by default: the embedded cluster's scheduler, workers and dashboard listen on
127.0.0.1 only.
"""

from __future__ import annotations

import os

from .errors import OptionsError


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def local_cluster(n_workers=None, memory_limit="auto", processes=True):
    """An embedded :class:`distributed.LocalCluster`: one thread per worker, loopback only.

    One thread per worker because each tile's task already uses every core it is
    given through the FFT library's threads; several threads per worker would
    oversubscribe the cores. The dashboard is served on a free loopback port
    (``client.dashboard_link``).
    """
    from distributed import LocalCluster

    n = n_workers or default_workers()
    if n < 1:
        raise OptionsError("workers", f"got {n}; expected >= 1")
    return LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=processes,
        host="127.0.0.1",
        # a free port on loopback: the scheduler serves HTTP even without the
        # dashboard, and a fixed port would collide with other clusters
        dashboard_address="127.0.0.1:0",
        memory_limit=memory_limit,
        silence_logs=40,  # logging.ERROR: keep the user's terminal readable
    )
