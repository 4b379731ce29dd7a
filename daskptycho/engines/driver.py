"""The one place that talks to ``distributed.Client``.

Engines describe work as pure functions and task graphs; the driver owns the
cluster (embedded or given), places tasks on workers, collects the per-iteration
cost for progress reports, and writes the optional Dask performance report.
"""

from __future__ import annotations

import contextlib
import operator

from ..cluster import connect


class Driver:
    """Context manager giving a client: the caller's, or one from :func:`daskptycho.cluster.connect`.

    Parameters
    ----------
    client : distributed.Client, optional
        Used as is (never closed by the driver).
    workers : int, optional
        Workers of an embedded cluster (default: the core count).
    report : str, optional
        Path of a Dask performance report (HTML) covering the whole run.
    cluster : str, optional
        Without a client: the cluster spec for :func:`~daskptycho.cluster.connect`
        (``local``, ``cuda``, ``ucx``, ``slurm`` ..., a scheduler address; default
        config ``daskptycho.cluster.spec``).
    **connect_options
        More :func:`~daskptycho.cluster.connect` keywords: ``jobs``,
        ``scheduler_file``, ``tls``, ``memory_limit``, ``device``.
    """

    def __init__(self, client=None, workers=None, report=None, cluster=None, **connect_options):
        self._given = client
        self.n_workers = workers
        self.report = report
        self.cluster_spec = cluster
        self.connect_options = connect_options
        self._stack = contextlib.ExitStack()
        self.client = None
        self.connection = None  # the Connection when the driver started or attached to the cluster itself

    def __enter__(self):
        from distributed import performance_report

        if self._given is None:
            self.connection = self._stack.enter_context(connect(self.cluster_spec, workers=self.n_workers, **self.connect_options))
            self.client = self.connection.client
        else:
            self.client = self._given
        # import the engine code on every worker first, so the memory baseline
        # (and the peak above it) counts arrays, not modules
        self.baseline = self.client.run(_warm_up)
        if self.report:
            self._stack.enter_context(performance_report(filename=str(self.report)))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def memory_report(self, tile_bytes, tile_workers):
        """Bytes each tile holds and each worker's measured peak resident memory.

        The peak is the worker process's high-water mark (``ru_maxrss``); the
        figure above the baseline (RSS after imports, before any data) is what the
        run's arrays, state and transients took at their largest.
        """
        peak = self.client.run(_peak_rss)
        return {
            "tile_bytes": {f"{k[0]},{k[1]}": b for k, b in tile_bytes.items()},
            "worker_peak_rss_bytes": {w: int(v) for w, v in peak.items()},
            "worker_peak_above_baseline_bytes": {w: int(v - self.baseline.get(w, 0)) for w, v in peak.items()},
            "tile_workers": {f"{k[0]},{k[1]}": w for k, w in tile_workers.items()},
        }

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
        nbytes = c.submit(_state_bytes, state, data, key="nbytes", **pin).result()
        del data, state
        return final, costs, self.memory_report({(0, 0): nbytes}, {(0, 0): w})


def _state_bytes(state, data):
    """Bytes the single-task engine holds: object, gradient buffers, patterns."""
    obj = int(state["object"].nbytes)
    return {"object": obj, "buffer": obj + obj // 2, "patterns": int(data.nbytes)}


class TileDriver(Driver):
    """Driver for engines whose state is split over tiles pinned to workers."""

    def place_tiles(self, keys):
        """Map tiles to workers: contiguous blocks of tiles (row-major) per worker,
        so neighbouring tiles often share a worker and their strips stay local."""
        ws = self.worker_addresses
        keys = list(keys)
        n = len(keys)
        return {k: ws[min(len(ws) - 1, i * len(ws) // n)] for i, k in enumerate(keys)}

    def submit_graph(self, graph, tile_workers, keys):
        """Submit an :class:`~daskptycho.schedule.IterationGraph` with each task
        pinned to its tile's worker; returns ``{key: Future}`` for ``keys`` (the
        other tasks' results are released as soon as their dependents have run)."""
        from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

        by_worker = {}
        for key, task in graph.tasks.items():
            tile = graph.placement.get(key)
            w = tile_workers[tile] if tile is not None else None
            by_worker.setdefault(w, {})[key] = task
        layers, deps = {}, {}
        for i, (w, tasks) in enumerate(by_worker.items()):
            ann = {"workers": [w], "allow_other_workers": False} if w is not None else None
            layers[f"daskptycho-{i}"] = MaterializedLayer(tasks, annotations=ann)
            deps[f"daskptycho-{i}"] = set()
        hlg = HighLevelGraph(layers, deps)
        keys = list(keys)
        futures = self.client.get(hlg, keys, sync=False)
        return dict(zip(keys, futures))

    def submit_pinned(self, func, *args, worker, key):
        return self.client.submit(func, *args, key=key, workers=[worker], allow_other_workers=False, pure=False)



def _warm_up():
    """Import the engine modules and run a tiny FFT; return this worker's RSS (bytes)."""
    import numpy as np
    import psutil

    from .. import backend, physics  # noqa: F401
    from . import ml, tiletasks  # noqa: F401

    backend.fft2(np.ones((2, 8, 8), np.complex64))
    _reset_peak()
    return psutil.Process().memory_info().rss


def _reset_peak():
    """Reset this process's peak-RSS mark (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss():
    """High-water mark of this worker process's resident memory (bytes) since the
    baseline: VmHWM (reset at warm-up) where /proc exists. Not ``ru_maxrss``: that
    survives execve, so a worker would inherit the peak of the process that started it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
