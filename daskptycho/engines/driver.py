"""The one place that talks to ``distributed.Client``.

Engines describe work as pure functions and task graphs; the driver owns the
cluster (embedded or given), places tasks on workers, collects the per-iteration
cost for progress reports, and writes the optional Dask performance report.
"""

from __future__ import annotations

import contextlib
import operator
import time
import uuid

from .. import config
from .. import dashboard as _dashboard  # noqa: F401  (adds /daskptycho to the dashboards of schedulers started from here on)
from ..cluster import connect
from ..errors import DaskptychoError

#: The phases every task of a run is filed under (distributed spans ``("daskptycho", phase)``).
PHASES = ("load", "grad", "passes", "update")

#: Task-key prefix -> phase. gd: gradients, then the strip passes (each strip is
#: applied by the receiving tile's next strip or its update), then the tile updates; hve: the independent tile step is ``grad``, the core-to-halo exchange is
#: ``passes``; dm: the exit waves and Fourier constraint (and the partial sums taken
#: from them) are ``grad``, the tree reductions ``passes``, forming the object and probe
#: and handing out the new crops ``update``; ml: its one task per iteration is ``grad``.
#: Scalar reductions (``cost``) count as ``passes``; the live previews, checkpoint
#: writes and the final core cut-outs as ``update``; restoring from a checkpoint as ``load``.
PHASE_OF_PREFIX = {
    "load": "load", "init": "load", "crop-init": "load", "views-init": "load", "load-patterns": "load", "init-state": "load",
    "restore": "load", "crop-restore": "load", "views-restore": "load", "dm-object-init": "load", "dm-object-restore": "load",
    "grad": "grad", "tile-cost": "grad", "hve-step": "grad", "ml-iteration": "grad",
    "dm-views": "grad", "dm-partial": "grad", "dm-error": "grad", "dm-state": "grad", "dm-probe-partial": "grad",
    "vfwd-strip": "passes", "vbwd-strip": "passes", "hfwd-strip": "passes", "hbwd-strip": "passes", "buffer": "passes",
    "hve-core": "passes", "hve-paste": "passes", "tile-probe": "passes", "probe-sum": "passes",
    "dm-sum": "passes", "dm-probe-sum": "passes", "cost": "passes",
    "update": "update", "probe": "update", "dm-object-update": "update", "dm-object": "update", "dm-crop": "update",
    "dm-probe-update": "update", "dm-probe": "update", "dm-mixing": "update", "preview": "update", "core": "update",
    "nbytes": "update", "checkpoint": "update", "checkpoint-object": "update", "checkpoint-probe": "update",
}


def phase_of(key):
    """The phase (one of :data:`PHASES`) of a task key, or None for keys of no phase.

    ``("vfwd-strip", 3, 0, 1)`` -> ``"passes"``; string keys use their prefix
    before a trailing ``-<number>`` (``"ml-iteration-7"`` -> ``"grad"``).
    """
    if isinstance(key, tuple):
        name = key[0] if key and isinstance(key[0], str) else ""
    else:
        name = str(key)
        head, _, tail = name.rpartition("-")
        if head and tail.isdigit():
            name = head
    return PHASE_OF_PREFIX.get(name)


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
        from .. import latency

        latency.parse_interval(config.get("cluster.message-interval", "auto"))  # a bad setting fails before any cluster starts
        try:
            return self._enter()
        except BaseException:  # an interrupt or an error while starting: close what was started
            self._stack.close()
            raise

    def _enter(self):
        from distributed import performance_report

        from .. import latency

        if self._given is None:
            self.connection = self._stack.enter_context(connect(self.cluster_spec, workers=self.n_workers, **self.connect_options))
            self.client = self.connection.client
        else:
            self.client = self._given
        # an iteration is a chain of small dependent tasks: no batching delay per hop
        latency.apply(self.client)
        # import the engine code on every worker first, so the memory baseline
        # (and the peak above it) counts arrays, not modules
        self.baseline = self.client.run(_warm_up)
        if self.report:
            # Bokeh's scripts inside the file: a report opens offline, on a beamline machine
            self._stack.enter_context(performance_report(filename=str(self.report), mode="inline"))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def memory_report(self, tile_bytes, tile_workers):
        """Bytes each tile holds and each worker's measured peak resident memory.

        The peak is the worker process's high-water mark (``ru_maxrss``); the
        figure above the baseline (RSS after imports, before any data) is what the
        run's arrays, state and transients took at their largest.
        """
        # a worker that died after the run's results were in has no peak to report
        peak = {w: v for w, v in self.client.run(_peak_rss, on_error="return").items() if not isinstance(v, BaseException)}
        return {
            "tile_bytes": {f"{k[0]},{k[1]}": b for k, b in tile_bytes.items()},
            "worker_peak_rss_bytes": {w: int(v) for w, v in peak.items()},
            "worker_peak_above_baseline_bytes": {w: int(v - self.baseline.get(w, 0)) for w, v in peak.items()},
            "tile_workers": {f"{k[0]},{k[1]}": w for k, w in tile_workers.items()},
        }

    @property
    def worker_addresses(self):
        # asked of the scheduler each time: the client's cached scheduler_info can be replaced,
        # between the refresh and the read, by its periodic refresh that lists no workers
        return sorted(self.client.nthreads())

    def span(self, *names):
        """A named span the dashboard groups tasks under.

        A phase name (``load``, ``grad``, ``passes``, ``update``) gives that phase's
        span of this run, ``("daskptycho", phase)``, with the same ids every time,
        so every iteration's tasks of a phase land in one span. Any other name
        opens a new ``distributed.span("daskptycho", *names)``.
        """
        import dask
        from distributed import span

        if len(names) == 1 and names[0] in PHASES:
            return dask.annotate(span=self.span_annotation(names[0]))
        return span("daskptycho", *names)

    def span_annotation(self, phase):
        """The ``"span"`` annotation of ``phase`` in this run, as ``distributed.span``
        writes it: ``{"name": ("daskptycho", phase), "ids": (root id, phase id)}``.

        The scheduler's ``SpansSchedulerExtension`` files each task under the span
        named by its annotation (the last id identifies it; the earlier ones its
        parents), so fixed ids per run give one ``daskptycho`` span with one child
        per phase.
        """
        ids = self.__dict__.get("_span_ids")
        if ids is None:
            import uuid

            ids = self.__dict__["_span_ids"] = {p: str(uuid.uuid4()) for p in ("daskptycho", *PHASES)}
        return {"name": ("daskptycho", phase), "ids": (ids["daskptycho"], ids[phase])}

    # ------------------------------------------------------------------ live state (dashboard)
    def live_begin(self, engine, iterations, tiles=(1, 1), rounds=1):
        """Tell the scheduler's live state (the ``/daskptycho`` dashboard page) a run starts.

        Parameters
        ----------
        engine : str
        iterations : int
        tiles : (rows, cols), the tile (or part) grid whose progress the page draws
        rounds : int, pass rounds per iteration (``update`` tasks per tile per iteration)

        Returns
        -------
        str or None: the page's address (also ``self.dashboard_page``, and logged at INFO
        on the ``daskptycho`` logger).
        """
        import logging

        from .. import config, dashboard

        self.__dict__["dashboard_page"] = None
        if not config.get("dashboard.live", True):
            self.__dict__["_live"] = None
            return None
        self.__dict__["_live"] = {"engine": engine, "iterations": int(iterations), "preview_at": None}
        try:
            served = self.client.run_on_scheduler(dashboard.begin_run, engine=engine, iterations=int(iterations),
                                                  tiles=[int(tiles[0]), int(tiles[1])], rounds=int(rounds))
        except Exception as e:  # a scheduler that cannot import daskptycho: run on, without the page
            self.__dict__["_live"] = None
            import warnings

            warnings.warn(f"daskptycho: no live dashboard state on this scheduler ({type(e).__name__}: {e})", RuntimeWarning,
                          stacklevel=2)
            return None
        try:
            link = self.client.dashboard_link
        except Exception:  # a scheduler without an HTTP dashboard
            link = None
        #: the live page's address (None without a dashboard), for the CLI or a notebook to show
        self.__dict__["dashboard_page"] = link.rsplit("/", 1)[0] + dashboard.ROUTE if served and link else None
        if self.dashboard_page:
            logging.getLogger("daskptycho").info("live reconstruction page: %s", self.dashboard_page)
        return self.dashboard_page

    def preview(self, it, states, regions=None, workers=None, origins=None, modes=None):
        """Submit the tiny tasks that cut a downsampled phase image of the current
        object out of each tile's core (never the whole tile moves).

        Parameters
        ----------
        it : int, the iteration
        states : dict ``{tile: future}``: object (S, h, w), or a dict with ``"object"``
        regions : dict ``{tile: (slice y, slice x)}``: each tile's core inside its state
            (with ``origins``); None: ``states`` holds one whole object
        workers : dict ``{tile: address}``, optional (pins each task to its tile's worker)
        origins : dict ``{tile: (y0, x0)}``: the core's first pixel in the whole object
        modes : slice, optional: the entries of the first axis to draw (dm: ``slice(0, 1)``,
            the dominant object mode); default: every slice, phases summed

        The image's longest side is ``daskptycho.dashboard.preview_px`` (256) pixels. An
        image is cut at most once every ``daskptycho.dashboard.preview_every_s`` seconds
        (and always for the run's first and last iteration); the cost goes out every iteration.

        Returns
        -------
        dict: what :meth:`publish` takes as ``image`` (``None`` without a live page, or
        when this iteration gets no image).
        """
        live = self.__dict__.get("_live")
        if not live:
            return None
        from .. import dashboard

        # a few tasks per tile and a gather through this process: at most one image per
        # preview_every_s (the first and the last iteration always get theirs)
        now = time.monotonic()
        last = it + 1 >= live["iterations"]
        if not last and live["preview_at"] is not None and now - live["preview_at"] < dashboard.preview_every_s():
            return None
        live["preview_at"] = now
        size = dashboard.preview_px()
        if regions is None:
            stride = full = None
            regions = {k: (modes, slice(None), slice(None)) if modes else (slice(None), slice(None)) for k in states}
            origins = {k: (0, 0) for k in states}
        else:
            full = (max(origins[k][0] + r[0].stop - r[0].start for k, r in regions.items()),
                    max(origins[k][1] + r[1].stop - r[1].start for k, r in regions.items()))
            stride = max(1, -(-max(full) // size))
        futs = {}
        for k, st in states.items():
            pin = dict(workers=[workers[k]], allow_other_workers=False) if workers else {}
            with self.span("update"):
                futs[k] = self.client.submit(dashboard.phase_preview, st, regions[k], origins[k], stride, size,
                                             key=("preview", it, *k, uuid.uuid4().hex[:8]), pure=False, **pin)
        return {"futures": futs, "stride": stride, "shape": full, "workers": dict(workers or {})}

    def publish(self, it, cost, image=None):
        """Send one iteration's live state to the scheduler: iteration, cost and the
        small phase image from :meth:`preview` (gathered here: a few KiB per tile).

        Per-tile progress needs no message: the scheduler-side state watches the
        tiles' ``update`` tasks finish.
        """
        live = self.__dict__.get("_live")
        if not live:
            return
        from .. import dashboard

        msg = {"engine": live["engine"], "iteration": int(it), "cost": float(cost)}
        if image is not None:
            keys = list(image["futures"])
            pieces = dict(zip(keys, self.results([image["futures"][k] for k in keys], image["workers"])))
            msg.update(dashboard.stitch_preview(pieces, image["stride"], image["shape"]))
        self.client.run_on_scheduler(dashboard.receive, msg=msg)
        # the small figures also go to the scheduler's event log (the /events page)
        self.client.log_event("daskptycho", {k: msg[k] for k in ("engine", "iteration", "cost")})

    # ------------------------------------------------------------------ lost workers
    def lost_workers(self, placement):
        """The workers of ``placement`` (``{tile: address}``) that have left the cluster."""
        alive = set(self.client.nthreads())
        return sorted(set(placement.values()) - alive)

    def wait_alive(self, futures, placement, poll=None):
        """Wait for ``futures`` while checking that the workers holding tiles live.

        Parameters
        ----------
        futures : list of Future (None entries are skipped)
        placement : dict ``{tile: address}``
        poll : float, optional
            Seconds between checks (``daskptycho.recovery.poll_s``).

        Raises
        ------
        WorkerLost
            A worker of ``placement`` left (its pinned tasks would wait for ever), or a
            future erred with ``KilledWorker`` or was cancelled.
        """
        from distributed import wait
        from distributed.client import CancelledError

        poll = poll or float(config.get("recovery.poll_s", 0.5))
        futures = [f for f in futures if f is not None]
        with self.client.as_current():
            while True:
                try:
                    wait(futures, timeout=poll)
                    break
                except TimeoutError:
                    lost = self.lost_workers(placement)
                    if lost:
                        raise WorkerLost(lost) from None
                except CancelledError as e:  # the scheduler forgot keys whose worker died
                    raise WorkerLost(self.lost_workers(placement), " ".join(str(e).split())[:400]) from None
        for f in futures:
            self._raise_if_lost(f, placement)

    def results(self, futures, placement, poll=None):
        """The results of ``futures``, whatever moment a worker of ``placement`` dies.

        A worker can die while the tasks run, after they finished but before their
        results are fetched (the scheduler then forgets or recomputes keys it held,
        and a task pinned to the dead worker would wait for ever), or during the
        fetch. Each of these raises :class:`WorkerLost`, never a cancelled future or
        a hang; an error of the task itself is raised as it is.

        Parameters
        ----------
        futures : list of Future (None entries give None)
        placement : dict ``{tile: address}``
        poll : float, optional
            Seconds between liveness checks (``daskptycho.recovery.poll_s``).

        Returns
        -------
        list, the results in the order of ``futures``
        """
        poll = poll or float(config.get("recovery.poll_s", 0.5))
        self.wait_alive(futures, placement, poll)
        return [None if f is None else self._result(f, placement, poll) for f in futures]

    def _result(self, f, placement, poll):
        from distributed.client import CancelledError

        while True:
            try:
                return f.result(timeout=poll)
            except CancelledError as e:
                raise WorkerLost(self.lost_workers(placement), " ".join(str(e).split())[:400]) from None
            except Exception as e:
                self._raise_if_lost(f, placement)  # the task's own error is raised there, as it is
                # a timed-out fetch polls again; a broken one gives the scheduler a few polls
                # to see the worker go (a comm can break before the scheduler hears of it)
                for _ in range(1 if isinstance(e, TimeoutError) else 10):
                    lost = self.lost_workers(placement)
                    if lost:  # its result went with the worker, or the fetch broke when it died
                        raise WorkerLost(lost, f"while fetching {f.key}") from None
                    if not isinstance(e, TimeoutError):
                        time.sleep(poll)
                if not isinstance(e, TimeoutError):
                    raise

    def _raise_if_lost(self, f, placement):
        """Raise WorkerLost if ``f`` was cancelled or erred with KilledWorker; raise the
        task's own error if it erred otherwise."""
        from distributed.scheduler import KilledWorker

        if f.status == "cancelled":
            raise WorkerLost(self.lost_workers(placement), f"task {f.key} was cancelled")
        if f.status == "error":
            exc = f.exception()
            if isinstance(exc, KilledWorker):
                raise WorkerLost(self.lost_workers(placement), f"task {f.key}: {exc}")
            f.result()  # a real error: raise it as it is

    # ------------------------------------------------------------------ single-task engines
    def run_sequential(self, load, step, init, iterations, progress=None, worker=None, start=0, costs=None, after=None):
        """Run ``state = step(state, data, it)`` for each iteration on one pinned worker.

        ``load()`` runs on that worker and its result (the patterns) never leaves it;
        only each iteration's scalar cost travels back, for progress. A resumed run
        starts at iteration ``start`` with the ``costs`` so far (``init`` then reads the
        checkpoint); ``after(it, state, costs, worker)`` runs after each iteration (it
        writes checkpoints).

        Returns the final state (gathered) and the list of costs.
        """
        c = self.client
        w = worker or self.worker_addresses[0]
        pin = dict(workers=[w], allow_other_workers=False, pure=False)
        self.live_begin("ml", iterations)
        tag = uuid.uuid4().hex[:8]  # keys unique to this run: another run's may linger on the workers
        with self.span("load"):
            data = c.submit(load, key=("load-patterns", tag), **pin)
            state = c.submit(init, key=("init-state", tag), **pin)
        costs = list(costs or [])
        pending = []  # iterations submitted whose cost has not been reported

        def report():
            it, st, cost, image = pending.pop(0)
            (cost,) = self.results([cost], {(0, 0): w})
            cost = float(cost)
            costs.append(cost)
            self.publish(it, cost, image)
            if progress is not None:
                progress(it, cost)
            if after is not None:
                after(it, st, costs, w)

        try:
            for it in range(start, iterations):
                with self.span("grad"):
                    state = c.submit(step, state, data, it, key=("ml-iteration", it, tag), **pin)
                image = self.preview(it, {(0, 0): state}, workers={(0, 0): w})
                with self.span("passes"):
                    cost = c.submit(operator.getitem, state, "cost", key=("cost", it, tag), **pin)
                pending.append((it, state, cost, image))
                # the next iteration is queued on the worker before this one's cost is awaited,
                # so the worker never waits for a round trip through the client between steps
                if len(pending) > 1:
                    report()
            while pending:
                report()
            with self.span("update"):
                nbytes = c.submit(_state_bytes, state, data, key=("nbytes", tag), **pin)
            final, nbytes = self.results([state, nbytes], {(0, 0): w})
        except WorkerLost as e:  # the one worker held the whole state: there is nothing to move
            raise RecoveryError(f"{e}; engine 'ml' keeps its whole state on one worker and does not recover: "
                                "rerun with checkpoint_every and resume=True to continue from the last checkpoint, "
                                "or use engine 'gd', which recovers by itself") from None
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
        pinned to its tile's worker and filed under its phase's span (one layer per
        worker and phase: annotations are per layer); returns ``{key: Future}`` for
        ``keys`` (the other tasks' results are released as soon as their dependents
        have run)."""
        from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

        groups = {}
        for key, task in graph.tasks.items():
            tile = graph.placement.get(key)
            w = tile_workers[tile] if tile is not None else None
            groups.setdefault((w, phase_of(key)), {})[key] = task
        layers, deps = {}, {}
        for i, ((w, phase), tasks) in enumerate(groups.items()):
            ann = {"workers": [w], "allow_other_workers": False} if w is not None else {}
            if phase is not None:
                ann["span"] = self.span_annotation(phase)
            layers[f"daskptycho-{i}"] = MaterializedLayer(tasks, annotations=ann or None)
            deps[f"daskptycho-{i}"] = set()
        hlg = HighLevelGraph(layers, deps)
        keys = list(keys)
        futures = self.client.get(hlg, keys, sync=False)
        return dict(zip(keys, futures))

    def submit_pinned(self, func, *args, worker, key):
        """Submit one task on ``worker`` only, under the span of its key's phase."""
        phase = phase_of(key)
        with self.span(phase) if phase else contextlib.nullcontext():
            return self.client.submit(func, *args, key=key, workers=[worker], allow_other_workers=False, pure=False)

    def replace_tiles(self, placement, expected_workers=None, wait_s=None):
        """Move the tiles of lost workers to the live ones (surviving or restarted).

        Tiles whose worker lives stay where they are; each lost tile goes to the live
        worker holding the fewest tiles. Waits up to ``wait_s``
        (``daskptycho.recovery.wait_for_workers_s``) for ``expected_workers`` workers
        (a nanny restarts a killed one), then uses whatever lives.

        Returns
        -------
        dict ``{tile: address}``, and the list of tiles that moved.
        """
        from .. import config

        wait_s = float(config.get("recovery.wait_for_workers_s", 20) if wait_s is None else wait_s)
        deadline = time.monotonic() + wait_s
        # a cancelled key or a broken fetch can reveal the loss before the scheduler has
        # removed the worker: wait until it has, or the lost tiles would stay where they were
        while not self.lost_workers(placement) and time.monotonic() < deadline:
            time.sleep(0.1)
        if expected_workers:
            try:
                self.client.wait_for_workers(expected_workers, timeout=max(deadline - time.monotonic(), 1.0))
            except TimeoutError:
                pass
        alive = self.worker_addresses
        if not alive:
            raise RecoveryError("every worker of the cluster is gone: nothing left to run the tiles on")
        new = {k: w for k, w in placement.items() if w in alive}
        load = {w: 0 for w in alive}
        for w in new.values():
            load[w] += 1
        moved = [k for k in placement if k not in new]
        for k in moved:
            w = min(alive, key=lambda a: (load[a], a))
            new[k] = w
            load[w] += 1
        return {k: new[k] for k in placement}, moved


def _warm_up():
    """Import the engine modules, run a tiny FFT and load the compiled CPU kernels
    (:func:`daskptycho.physics.fused.warm_up`); return this worker's RSS (bytes)."""
    import numpy as np
    import psutil

    from .. import backend, physics  # noqa: F401
    from ..physics import fused
    from . import ml, tiletasks  # noqa: F401

    backend.fft2(np.ones((2, 8, 8), np.complex64))
    fused.warm_up()
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


class WorkerLost(Exception):
    """Workers holding tiles left the cluster (internal: the engines catch it and recover).

    Attributes
    ----------
    lost : list of str, the addresses gone
    """

    def __init__(self, lost, detail=""):
        self.lost = list(lost)
        super().__init__(f"lost worker(s) {', '.join(self.lost) or '(unknown)'}{': ' + detail if detail else ''}")


class RecoveryError(DaskptychoError, RuntimeError):
    """Workers kept dying: more recoveries than ``daskptycho.recovery.max_recoveries``."""
