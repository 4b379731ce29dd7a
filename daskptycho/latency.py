"""Message batching between the scheduler and the workers, tuned for latency-bound graphs.

distributed batches the small messages of its scheduler-worker streams: the
scheduler sends a worker at most one batch every 5 ms, a worker the scheduler at
most one every 2 ms (``distributed.batched.BatchedSend``; fixed in the code, not in
``dask.config``). A message that comes sooner after the last batch waits for the
interval to pass. That is the right trade for graphs of many thousands of short
tasks; it is the wrong one for a gradient-decomposition iteration, a chain of a few
dozen small strip tasks between the tiles' large gradient tasks, in which every
dependency costs a scheduler round trip: measured on a 2-core machine, a chain of
trivial tasks on one worker advanced by 5.7 ms per task with the default intervals
and 1.6-2.1 ms with none (``docs/performance.md``).

``daskptycho.cluster.message-interval`` sets both intervals for a run:

``auto`` (default)
    no batching delay (0 ms) on clusters whose ``Cluster`` object lives in this
    process (a ``LocalCluster``, ``LocalCUDACluster`` or dask-jobqueue cluster that
    this process started, with ``daskptycho.connect`` or by hand); a scheduler
    reached by address is left as it is.
a duration (``0ms``, ``1ms`` ...)
    that interval on any cluster (a remote scheduler must be able to import
    daskptycho, as for the dashboard page).
``default``
    never touch distributed's own intervals.

The setting is carried by a scheduler plugin and a worker plugin, so workers that
join later (a restarted worker, a new batch job) get it too. It changes when
messages leave, never what they say: results are bit for bit the same.
"""

from __future__ import annotations

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from .errors import OptionsError

KEY = "daskptycho.cluster.message-interval"
NAME = "daskptycho-message-interval"


def parse_interval(value):
    """The configured interval: ``"auto"``, ``None`` (distributed's own) or seconds (float >= 0).

    Raises
    ------
    OptionsError
        Not ``auto``, ``default`` or a non-negative duration (``"0ms"``, ``0.001``).
    """
    from dask.utils import parse_timedelta

    if value is None or (isinstance(value, str) and value.strip().lower() in ("default", "none", "null", "")):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        seconds = float(parse_timedelta(value, default="ms"))
    except (TypeError, ValueError, KeyError, AttributeError):
        seconds = None
    if seconds is None or not seconds >= 0 or seconds > 1:
        raise OptionsError(KEY, f"got {value!r}; expected auto, default or a duration from 0ms to 1s (e.g. 0ms)")
    return seconds


def _set(stream, seconds):
    """Set one ``BatchedSend``'s interval (nothing where distributed has no such attribute)."""
    if stream is not None and hasattr(stream, "interval"):
        stream.interval = seconds


class SchedulerMessageInterval(SchedulerPlugin):
    """Sets the interval of the scheduler's stream to every worker, now and as workers join."""

    idempotent = True  # registered again by every run on the same cluster: a no-op

    def __init__(self, seconds):
        self.seconds = float(seconds)
        self.name = f"{NAME}-{self.seconds:g}"

    async def start(self, scheduler):
        for stream in getattr(scheduler, "stream_comms", {}).values():
            _set(stream, self.seconds)

    def add_worker(self, scheduler, worker):
        # distributed makes the worker's stream before it calls the plugins' add_worker
        _set(getattr(scheduler, "stream_comms", {}).get(worker), self.seconds)


class WorkerMessageInterval(WorkerPlugin):
    """Sets the interval of a worker's stream to the scheduler."""

    idempotent = True

    def __init__(self, seconds):
        self.seconds = float(seconds)
        self.name = f"{NAME}-{self.seconds:g}"

    def setup(self, worker):
        _set(getattr(worker, "batched_stream", None), self.seconds)


def intervals(client):
    """The intervals in force (seconds): ``{"scheduler": {worker: s}, "workers": {worker: s}}``."""

    def on_scheduler(dask_scheduler=None):
        return {w: getattr(s, "interval", None) for w, s in getattr(dask_scheduler, "stream_comms", {}).items()}

    def on_worker(dask_worker=None):
        return getattr(getattr(dask_worker, "batched_stream", None), "interval", None)

    return {"scheduler": client.run_on_scheduler(on_scheduler), "workers": client.run(on_worker)}


def apply(client, setting=None):
    """Set the message intervals of ``client``'s cluster from ``setting`` (default: the config).

    Returns
    -------
    float or None: the interval set (seconds), None where nothing was changed.
    """
    import dask.config

    seconds = parse_interval(dask.config.get(KEY, "auto") if setting is None else setting)
    if seconds is None:
        return None
    if seconds == "auto":
        if getattr(client, "cluster", None) is None:  # a scheduler reached by address: not ours to tune
            return None
        seconds = 0.0
    try:
        client.register_plugin(SchedulerMessageInterval(seconds))
        client.register_plugin(WorkerMessageInterval(seconds))
    except Exception as e:  # a remote scheduler without daskptycho: run on with distributed's own intervals
        import warnings

        warnings.warn(f"daskptycho: {KEY} not applied ({type(e).__name__}: {e}); the scheduler keeps its own message "
                      "batching", RuntimeWarning, stacklevel=2)
        return None
    return seconds
