"""The one place that talks to ``distributed.Client``.

Engines describe work as pure functions and task graphs; the driver owns the
cluster (embedded or given), places tasks on workers, collects the per-iteration
cost for progress reports, and writes the optional Dask performance report.
"""

from __future__ import annotations

import contextlib
import operator

import numpy as np

from ..cluster import local_cluster


class Driver:
    """Context manager giving a client: the caller's, or an embedded LocalCluster's.

    Parameters
    ----------
    client : distributed.Client, optional
        Used as is (never closed by the driver).
    workers : int, optional
        Workers of the embedded cluster (default: the core count).
    report : str, optional
        Path of a Dask performance report (HTML) covering the whole run.
    """

    def __init__(self, client=None, workers=None, report=None):
        self._given = client
        self.n_workers = workers
        self.report = report
        self._stack = contextlib.ExitStack()
        self.client = None

    def __enter__(self):
        from distributed import Client, performance_report

        if self._given is None:
            cluster = self._stack.enter_context(local_cluster(self.n_workers))
            self.client = self._stack.enter_context(Client(cluster))
        else:
            self.client = self._given
        if self.report:
            self._stack.enter_context(performance_report(filename=str(self.report)))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    @property
    def worker_addresses(self):
        return sorted(self.client.scheduler_info(n_workers=-1)["workers"])

    def span(self, *names):
        """A named span (phase) the dashboard groups tasks under."""
        from distributed import span

        return span("daskptycho", *names)

    # ------------------------------------------------------------------ single-task engines
    def run_sequential(self, load, step, init, iterations, progress=None, worker=None):
        """Run ``state = step(state, data, it)`` for each iteration on one pinned worker.

        ``load()`` runs on that worker and its result (the patterns) never leaves it;
        only each iteration's scalar cost travels back, for progress.

        Returns the final state (gathered) and the list of costs.
        """
        c = self.client
        w = worker or self.worker_addresses[0]
        pin = dict(workers=[w], allow_other_workers=False, pure=False)
        with self.span("load"):
            data = c.submit(load, key="load-patterns", **pin)
        state = c.submit(init, key="init-state", **pin)
        costs = []
        for it in range(iterations):
            with self.span("iteration"):
                state = c.submit(step, state, data, it, key=f"ml-iteration-{it}", **pin)
            cost = c.submit(operator.getitem, state, "cost", key=f"cost-{it}", **pin).result()
            costs.append(float(cost))
            if progress is not None:
                progress(it, float(cost))
        final = state.result()
        del data, state
        return final, costs


def as_host(a):
    return np.asarray(a)
