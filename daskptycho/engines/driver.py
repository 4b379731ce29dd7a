"""The one place that talks to ``distributed.Client``.

Engines describe work as pure functions and task graphs; the driver owns the
connection to the cluster (embedded or given), submits tasks pinned to workers under
the spans of their phases, waits for and fetches results (turning a lost worker into
:class:`~daskptycho.errors.WorkerLost`, whenever it dies), places units on workers and
moves the units of lost workers, and writes the optional Dask performance report.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import dask
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from distributed import Future, performance_report, span, wait
from distributed.client import CancelledError
from distributed.scheduler import KilledWorker

from .. import config, latency
from .. import dashboard as _dashboard  # noqa: F401  (adds /daskptycho to the dashboards of schedulers started from here on)
from ..cluster import connect
from ..errors import PeerExchangeError, RecoveryError, WorkerLost
from ..keys import PHASES, phase_of
from ..tasks import peer
from . import memory

# liveness polls (``daskptycho.recovery.poll_s`` apart) the driver gives the scheduler to
# see a worker go when a fetch or a peer message broke: either can break before the
# scheduler hears of the death
LOSS_POLLS = 10


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

    Attributes
    ----------
    client : distributed.Client
    baseline : dict ``{worker: bytes}``, each worker's RSS after warm-up (see :mod:`.memory`)
    """

    def __init__(self, client=None, workers=None, report=None, cluster=None, **connect_options):
        self._given = client
        self.n_workers = workers
        self.report = report
        self.cluster_spec = cluster
        self.connect_options = connect_options
        self._stack = contextlib.ExitStack()
        self._span_ids = None
        self.client = None
        self.connection = None  # the Connection when the driver started or attached to the cluster itself

    def __enter__(self):
        latency.parse_interval(config.get("cluster.message-interval", "auto"))  # a bad setting fails before any cluster starts
        try:
            return self._enter()
        except BaseException:  # an interrupt or an error while starting: close what was started
            self._stack.close()
            raise

    def _enter(self):
        if self._given is None:
            self.connection = self._stack.enter_context(connect(self.cluster_spec, workers=self.n_workers, **self.connect_options))
            self.client = self.connection.client
        else:
            self.client = self._given
        # an iteration is a chain of small dependent tasks: no batching delay per hop
        latency.apply(self.client)
        # import the engine code on every worker first, so the memory baseline
        # (and the peak above it) counts arrays, not modules
        self.baseline = self.client.run(memory.warm_up)
        if self.report:
            # Bokeh's scripts inside the file: a report opens offline, on a beamline machine
            self._stack.enter_context(performance_report(filename=str(self.report), mode="inline"))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    @property
    def worker_addresses(self):
        # asked of the scheduler each time: the client's cached scheduler_info can be replaced,
        # between the refresh and the read, by its periodic refresh that lists no workers
        return sorted(self.client.nthreads())

    def memory_report(self, unit_bytes, unit_workers):
        """:func:`daskptycho.engines.memory.report` of this cluster against the warm-up baseline."""
        return memory.report(self.client, self.baseline, unit_bytes, unit_workers)

    # ------------------------------------------------------------------ spans
    def span(self, *names):
        """A named span the dashboard groups tasks under.

        A phase name (``load``, ``grad``, ``passes``, ``update``) gives that phase's
        span of this run, ``("daskptycho", phase)``, with the same ids every time,
        so every iteration's tasks of a phase land in one span. Any other name
        opens a new ``distributed.span("daskptycho", *names)``.
        """
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
        if self._span_ids is None:
            self._span_ids = {p: str(uuid.uuid4()) for p in ("daskptycho", *PHASES)}
        ids = self._span_ids
        return {"name": ("daskptycho", phase), "ids": (ids["daskptycho"], ids[phase])}

    # ------------------------------------------------------------------ submitting
    def place(self, keys):
        """Map units (tiles, parts) to workers: contiguous blocks of units (row-major) per
        worker, so neighbouring tiles often share a worker and their strips stay local."""
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

    @staticmethod
    def is_future(x):
        """Is ``x`` a future of this client's cluster (a result computed elsewhere)?"""
        return isinstance(x, Future)

    def submit_pinned(self, func, *args, worker, key):
        """Submit one task on ``worker`` only, under the span of its key's phase."""
        phase = phase_of(key)
        with self.span(phase) if phase else contextlib.nullcontext():
            return self.client.submit(func, *args, key=key, workers=[worker], allow_other_workers=False, pure=False)

    def peer_exchange(self):
        """Make every worker (and every worker that joins later) able to receive peer
        messages (:class:`~daskptycho.tasks.peer.PeerExchange`; registering it again is a no-op)."""
        if not getattr(self, "_peer_registered", False):
            self.client.register_plugin(peer.PeerExchange(same_host_sockets=bool(config.get("schedule.same_host_sockets", True))))
            self._peer_registered = True

    def abort_peers(self, tag, reason):
        """Abort the peer messages of run attempt ``tag`` on every live worker: its stages
        still waiting for a message from a lost worker fail instead of holding on."""
        if getattr(self, "_peer_registered", False):
            self.client.run(peer.abort, tag, reason, on_error="ignore")

    # ------------------------------------------------------------------ waiting, lost workers
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
        while True:
            try:
                return f.result(timeout=poll)
            except CancelledError as e:
                raise WorkerLost(self.lost_workers(placement), " ".join(str(e).split())[:400]) from None
            except Exception as e:
                self._raise_if_lost(f, placement)  # the task's own error is raised there, as it is
                # a timed-out fetch polls again; a broken one gives the scheduler a few polls
                # to see the worker go (a comm can break before the scheduler hears of it)
                lost = self._lost_within(placement, 1 if isinstance(e, TimeoutError) else LOSS_POLLS)
                if lost:  # its result went with the worker, or the fetch broke when it died
                    raise WorkerLost(lost, f"while fetching {f.key}") from None
                if not isinstance(e, TimeoutError):
                    raise

    def _raise_if_lost(self, f, placement):
        """Raise WorkerLost if ``f`` was cancelled or erred with KilledWorker; raise the
        task's own error if it erred otherwise."""
        if f.status == "cancelled":
            raise WorkerLost(self.lost_workers(placement), f"task {f.key} was cancelled")
        if f.status == "error":
            exc = f.exception()
            if isinstance(exc, KilledWorker):
                raise WorkerLost(self.lost_workers(placement), f"task {f.key}: {exc}")
            if isinstance(exc, PeerExchangeError):
                # a peer that died breaks the messages to it at once, before the scheduler
                # hears of its death: give the scheduler a few polls to see it go
                lost = self._lost_within(placement, LOSS_POLLS)
                if lost:
                    raise WorkerLost(lost, f"task {f.key}: {exc}")
            f.result()  # a real error: raise it as it is

    def _lost_within(self, placement, polls):
        """The lost workers of ``placement``, polling up to ``polls`` times
        (``daskptycho.recovery.poll_s`` apart) until there is one; [] if none went."""
        poll = float(config.get("recovery.poll_s", 0.5))
        for i in range(polls):
            lost = self.lost_workers(placement)
            if lost or i == polls - 1:
                return lost
            time.sleep(poll)
        return []

    def replace_lost(self, placement, expected_workers=None, wait_s=None):
        """Move the units (tiles, parts) of lost workers to the live ones (surviving or restarted).

        Units whose worker lives stay where they are; each lost unit goes to the live
        worker holding the fewest. Waits up to ``wait_s``
        (``daskptycho.recovery.wait_for_workers_s``) for ``expected_workers`` workers
        (a nanny restarts a killed one), then uses whatever lives.

        Returns
        -------
        dict ``{unit: address}``, and the list of units that moved.
        """
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
