"""Distributed's periodic background work, tuned for latency-bound graphs: message
batching between the scheduler and the workers, and the workers' statistical profiler.

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

Every worker also samples its threads' Python stacks for the dashboard's profile page,
every 10 ms (``distributed.worker.profile.interval``), on its event loop and holding the
interpreter lock. A gd run's rounds meet at barriers a few milliseconds apart, so time
taken from either worker's task thread delays both: with 100 ms samples the default
run's iterations took 5-10% less time than with 10 ms ones on a 2-core machine
(``docs/performance.md``, "The default run against the single-task reference").
``daskptycho.cluster.profile-interval``
takes the same values (``auto``: 100 ms on clusters of this process); the profile page
still fills, ten times more coarsely.

The settings are carried by scheduler and worker plugins, so workers that join later
(a restarted worker, a new batch job) get them too. They change when messages leave and
how often stacks are sampled, never what is computed: results are bit for bit the same.
"""

from __future__ import annotations

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from .errors import OptionsError

KEY = "daskptycho.cluster.message-interval"
NAME = "daskptycho-message-interval"
PROFILE_KEY = "daskptycho.cluster.profile-interval"
PROFILE_NAME = "daskptycho-profile-interval"
PROFILE_AUTO_S = 0.1  # ``auto``'s sampling interval on clusters of this process


def parse_interval(value, key=KEY, low=0.0, high=1.0, example="0ms"):
    """The configured interval: ``"auto"``, ``None`` (distributed's own) or seconds (float).

    Parameters
    ----------
    value : str, float or None
        The setting (a bare number is milliseconds).
    key : str
        The setting's name, for the error.
    low, high : float
        The seconds a duration may take (``low`` excluded when it is above 0).

    Raises
    ------
    OptionsError
        Not ``auto``, ``default`` or a duration from ``low`` to ``high`` seconds.
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
    if seconds is None or not (seconds > low or (low == 0 and seconds == 0)) or seconds > high:
        raise OptionsError(key, f"got {value!r}; expected auto, default or a duration from {low * 1e3:g}ms to {high:g}s "
                                f"(e.g. {example})")
    return seconds


def parse_profile_interval(value):
    """The configured profile sampling interval: ``"auto"``, ``None`` (distributed's own)
    or seconds in (0, 10] (see :func:`parse_interval`)."""
    return parse_interval(value, PROFILE_KEY, low=0.0005, high=10.0, example="100ms")


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


class WorkerProfileInterval(WorkerPlugin):
    """Sets how often a worker samples its threads' stacks for the dashboard's profile page
    (its ``profile`` periodic callback; nothing where profiling is off). One name for
    every value: a run registering another value replaces the plugin and sets it again on
    every worker, and a worker that joins later gets the latest."""

    def __init__(self, seconds):
        self.seconds = float(seconds)
        self.name = PROFILE_NAME

    def setup(self, worker):
        callback = getattr(worker, "periodic_callbacks", {}).get("profile")
        if callback is not None and hasattr(callback, "callback_time"):
            callback.callback_time = self.seconds * 1e3  # milliseconds, from the next sample on


def profile_intervals(client):
    """Every worker's profile sampling interval in force (seconds; None where it does not profile)."""

    def on_worker(dask_worker=None):
        callback = getattr(dask_worker, "periodic_callbacks", {}).get("profile")
        return None if callback is None else callback.callback_time / 1e3

    return client.run(on_worker)


def intervals(client):
    """The intervals in force (seconds): ``{"scheduler": {worker: s}, "workers": {worker: s}}``."""

    def on_scheduler(dask_scheduler=None):
        return {w: getattr(s, "interval", None) for w, s in getattr(dask_scheduler, "stream_comms", {}).items()}

    def on_worker(dask_worker=None):
        return getattr(getattr(dask_worker, "batched_stream", None), "interval", None)

    return {"scheduler": client.run_on_scheduler(on_scheduler), "workers": client.run(on_worker)}


def apply(client, setting=None, profile=None):
    """Set the message intervals of ``client``'s cluster from ``setting`` and its workers'
    profile sampling interval from ``profile`` (defaults: the config).

    Returns
    -------
    float or None: the message interval set (seconds), None where nothing was changed.
    """
    import dask.config

    _apply_profile(client, dask.config.get(PROFILE_KEY, "auto") if profile is None else profile)
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


def _apply_profile(client, setting):
    """Set the workers' profile sampling interval from ``setting``; the seconds set or None."""
    seconds = parse_profile_interval(setting)
    if seconds is None:
        return None
    if seconds == "auto":
        if getattr(client, "cluster", None) is None:  # a scheduler reached by address: not ours to tune
            return None
        seconds = PROFILE_AUTO_S
    try:
        client.register_plugin(WorkerProfileInterval(seconds))
    except Exception as e:  # workers without daskptycho: they keep sampling at their own interval
        import warnings

        warnings.warn(f"daskptycho: {PROFILE_KEY} not applied ({type(e).__name__}: {e}); the workers keep their own "
                      "profile interval", RuntimeWarning, stacklevel=3)
        return None
    return seconds
