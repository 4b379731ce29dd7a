"""Starting or connecting to a Dask cluster: :func:`connect` and ``--cluster SPEC``.

Specs
-----
``local``
    An embedded :class:`distributed.LocalCluster` (the default).
``cuda``
    An embedded ``dask_cuda.LocalCUDACluster``: one worker per GPU, UCX when
    ``distributed-ucxx`` is installed.
``ucx``
    An embedded LocalCluster whose workers talk UCX (over loopback TCP unless
    ``UCX_TLS`` says otherwise).
``slurm``, ``lsf``, ``pbs`` (or any profile of ``cluster/jobqueue.yaml``)
    A dask-jobqueue cluster that submits ``jobs`` batch jobs of workers.
``tcp://host:port``, ``ucx://...``, ``tls://...``
    A running scheduler, attached to and never closed.

Safe by default: every embedded cluster's scheduler, workers and dashboard listen
on 127.0.0.1 only; with ``tls`` they also authenticate and encrypt every
connection (:class:`distributed.security.Security`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import numbers
import os
import signal
import weakref

from distributed.diagnostics.plugin import WorkerPlugin

from . import config
from .errors import DaskptychoError, DeviceError, OptionsError

logger = logging.getLogger(__name__)

#: The specs that start an embedded cluster; batch systems come from ``cluster/jobqueue.yaml``.
EMBEDDED = ("local", "cuda", "ucx")
BATCH_SYSTEMS = {"slurm": "SLURMCluster", "lsf": "LSFCluster", "pbs": "PBSCluster"}
_ADDRESS_PREFIXES = ("tcp://", "ucx://", "tls://", "inproc://")
_told = set()  # messages already logged once per process


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (it may be replaced after setup)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("daskptycho: %(message)s"))

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@contextlib.contextmanager
def log_to_stderr():
    """Within the ``with`` block, show daskptycho's INFO messages on stderr (the cluster
    starting, a batch cluster's job ids and dashboard, the live page's address, a lost
    worker's recovery). Nested blocks print each message once."""
    top = logging.getLogger("daskptycho")
    if any(isinstance(h, _StderrHandler) for h in top.handlers):
        yield
        return
    handler, level = _StderrHandler(), top.level
    top.addHandler(handler)
    top.setLevel(logging.INFO)
    try:
        yield
    finally:
        top.removeHandler(handler)
        top.setLevel(level)


#: loggers whose messages during the teardown after an interrupt are only noise
#: (connections closing under a task, workers killed, pending asyncio tasks)
_TEARDOWN_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh")


@contextlib.contextmanager
def quiet_logs(prefixes=_TEARDOWN_LOGGERS):
    """Disable every logger named ``prefix`` or ``prefix.*`` within the block (distributed
    sets levels on some of its child loggers, so the parent's level is not enough)."""
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in prefixes]
    loggers = [logging.getLogger(n) for n in sorted(set(names) | set(prefixes))]
    saved = [(lg, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, disabled in saved:
            lg.disabled = disabled


@contextlib.contextmanager
def _interrupts_held():
    """Hold SIGINT back from this thread, and from every thread and process started
    within the block, while a cluster starts.

    A terminal's Ctrl-C goes to the whole foreground process group, worker processes
    included: each would raise KeyboardInterrupt in its event loop and print tracebacks
    (its nanny then logs their deaths) above the one line the parent prints. A blocked
    signal mask is inherited by threads (the cluster's event loop, the nannies' process
    watchers) and survives fork and exec, so every worker process they spawn, a
    restarted one included, starts with SIGINT blocked and never sees the Ctrl-C; the
    parent alone handles it and closes the cluster. A Ctrl-C during the start itself is
    not lost: it is pending, and raised here when the block ends.

    multiprocessing's resource tracker, started by the first process a nanny spawns,
    unblocks SIGINT in the thread that starts it (its event loop thread here), so it is
    started first, from this thread.
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: no process groups to shield from
        yield
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # raises a pending KeyboardInterrupt


#: ``daskptycho.cluster.background: quiet``: distributed's periodic background work on the
#: clusters this process starts, where the workers fill the machine's cores
QUIET_BACKGROUND = {"distributed.admin.system-monitor.interval": "2s", "distributed.admin.tick.interval": "100ms",
                    "distributed.worker.profile.interval": "100ms"}


def background_settings():
    """The ``dask.config`` settings a cluster this process starts is made under
    (``daskptycho.cluster.background``).

    ``quiet`` (default)
        every process of the cluster (the scheduler, each nanny and each worker) reads its
        system figures (CPU, memory, network, disk, open files) every 2 s instead of
        distributed's 500 ms and checks that its event loop is responsive every 100 ms
        instead of 20 ms, and each worker samples its threads' stacks for the dashboard's
        profile page every 100 ms instead of 10 ms (the page fills ten times more
        coarsely; its system plots update every 2 s). On a machine whose cores the workers
        fill, that work takes a core from a tile's gradient while the other tiles wait for
        it at the round's barrier: with peer blocks of 8 iterations the default run's
        iterations took 3% less time on 2 cores (26.8 against 27.6 ms, ``python -m
        benchmarks cluster_settings``; none of the three alone made a difference this
        machine's noise could show); with blocks of 16, which leave the event loops less
        to do, the difference is within that noise (27.1 against 26.9 ms, 4 of 8 pairs).
    ``default``
        distributed's own settings (or the user's).

    Raises
    ------
    OptionsError
        Neither.
    """
    value = str(config.get("cluster.background", "quiet")).strip().lower()
    if value == "quiet":
        return dict(QUIET_BACKGROUND)
    if value == "default":
        return {}
    raise OptionsError("daskptycho.cluster.background", f"got {value!r}; expected quiet or default")


def _start(factory):
    """Call ``factory()`` (which starts a cluster) with interrupts held back from the
    workers, under :func:`background_settings`; a Ctrl-C that arrived meanwhile closes the
    new cluster quietly, then propagates."""
    import dask

    cluster = None
    try:
        with _interrupts_held(), dask.config.set(background_settings()):
            cluster = factory()
    except BaseException:
        if cluster is not None:
            _close_after_interrupt(cluster)
        raise
    return cluster


def _silence_this_process():
    """Run on a worker process about to be closed after an interrupt: nothing more of it
    reaches the terminal (its log records, asyncio's, anything written to stderr)."""
    import sys

    for name in [""] + list(logging.root.manager.loggerDict):
        logging.getLogger(name).disabled = True
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed or broken stderr is as quiet as it gets
        pass
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def _close_after_interrupt(cluster):
    """Close a cluster whose run was interrupted, without distributed's log of the teardown."""
    with quiet_logs():
        try:
            cluster.close()
        except Exception as e:  # noqa: BLE001 - the interrupt is what the user must see
            logger.debug("closing the interrupted cluster: %s", e)


class ClusterError(DaskptychoError, RuntimeError):
    """A cluster could not be started or reached (no workers arrived, scheduler unreachable).

    Parameters
    ----------
    message : str
    parameter : str, optional
        The :func:`connect` keyword it concerns (``"cluster"``, ``"scheduler_file"``).
    """

    def __init__(self, message, parameter=None):
        self.parameter = parameter
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.parameter))


class WorkerCores(WorkerPlugin):
    """Runs each worker process of an embedded cluster on its own share of the cores.

    ``shares``: ``{worker name: [cpu, ...]}``. On Linux every thread the worker has when
    it starts is pinned to its share (the threads it starts later inherit it); a worker
    with no share, or a system that refuses, runs where it did. A restarted worker is
    pinned again (the plugin comes with the worker's arguments)."""

    name = "daskptycho-worker-cores"

    def __init__(self, shares):
        self.shares = {str(k): sorted(int(c) for c in v) for k, v in shares.items()}

    def setup(self, worker):
        cpus = self.shares.get(str(worker.name))
        if cpus and hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task"):
            for tid in os.listdir("/proc/self/task"):
                try:
                    os.sched_setaffinity(int(tid), cpus)
                except OSError:  # a thread that ended meanwhile, or a sandbox that refuses
                    pass


def core_shares(n_workers):
    """``{i: [cpu, ...]}``: the cores this process may run on, split into ``n_workers``
    contiguous shares of equal size (as near as they divide), or None when there are
    fewer cores than workers or ``daskptycho.cluster.pin-workers`` is false.

    Why: on a machine whose cores the workers fill, a worker that may run anywhere has its
    message reader woken on whichever core the kernel picks, often one busy with another
    worker's gradient, and each round of a gd iteration waits for that message. Pinned,
    a worker's threads share its own cores: its reader runs as soon as its stage waits.
    The default run's iterations took 8-9% less time on 2 cores (24.6 against 26.7 ms,
    pinned faster in 7 of 8 pairs run side by side: ``python -m benchmarks cluster_settings``;
    with blocks of 8 iterations 26.7 against 29.1 ms, 9 of 12).

    Raises
    ------
    OptionsError
        The setting is not auto or false.
    """
    value = config.get("cluster.pin-workers", "auto")
    if value is False or str(value).strip().lower() in ("false", "no", "off", "0"):
        return None
    if str(value).strip().lower() not in ("auto", "true"):
        raise OptionsError("daskptycho.cluster.pin-workers", f"got {value!r}; expected auto or false")
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    n = int(n_workers)
    if n < 1 or len(cpus) < n:
        return None
    return {i: cpus[i * len(cpus) // n:(i + 1) * len(cpus) // n] for i in range(n)}


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def local_cluster(n_workers=None, memory_limit="auto", processes=True, *, protocol=None, security=None):
    """An embedded :class:`distributed.LocalCluster`: one thread per worker, loopback only.

    One thread per worker because each tile's task already uses every core it is
    given through the FFT library's threads; several threads per worker would
    oversubscribe the cores. The dashboard is served on a free loopback port
    (``client.dashboard_link``).

    Parameters
    ----------
    n_workers : int, optional
        Worker processes (default: :func:`default_workers`).
    memory_limit : str or int
        Per worker, as for LocalCluster (``"auto"``: the machine's memory shared out).
    processes : bool
        Worker processes (True) or threads of this process.
    protocol : str, optional
        ``"tcp://"`` (default), ``"ucx://"``, or ``"tls://"`` (set by ``security``).
    security : distributed.security.Security, optional
        TLS certificates; every connection is then ``tls://`` and encrypted.
    """
    from distributed import LocalCluster

    n = n_workers or default_workers()
    if n < 1:
        raise OptionsError("workers", f"got {n}; expected >= 1")
    extra = {}
    if security is not None:
        extra = {"protocol": "tls://", "security": security}
    elif protocol is not None:
        extra = {"protocol": protocol}
    shares = core_shares(n) if processes else None  # threads of this process are not pinned
    if shares:
        extra["plugins"] = [WorkerCores(shares)]
    how = "TLS" if security is not None else (protocol or "tcp").rstrip(":/").upper()
    logger.info("starting %d worker%s (LocalCluster, %s on 127.0.0.1) ...", n, "" if n == 1 else "s", how)
    return _start(lambda: LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=processes,
        host="127.0.0.1",
        # a free port on loopback: the scheduler serves HTTP even without the
        # dashboard, and a fixed port would collide with other clusters
        dashboard_address="127.0.0.1:0",
        memory_limit=memory_limit,
        silence_logs=40,  # logging.ERROR: keep the user's terminal readable
        **extra,
    ))


class Connection:
    """A :class:`distributed.Client` and, when :func:`connect` started one, its cluster.

    A context manager: on exit the client is closed, and the cluster too if this
    connection started it (a scheduler given by address or scheduler file is left
    running).

    Attributes
    ----------
    client : distributed.Client
    cluster : distributed.deploy.Cluster or None
        The cluster this connection started (None when attached to a running one).
    spec : str
        What was asked for (``"local"``, ``"slurm"``, an address, ``"scheduler-file"``).
    device : {"cpu", "gpu"}
        Where the engines should keep arrays (``"gpu"`` on a ``cuda`` cluster).
    security : distributed.security.Security or None
        The TLS settings in use.
    """

    def __init__(self, client, cluster=None, *, spec, device="cpu", security=None):
        self.client = client
        self.cluster = cluster
        self.spec = spec
        self.device = device
        self.security = security
        _OPEN.add(self)

    @property
    def scheduler_address(self) -> str:
        return self.client.scheduler.address

    @property
    def dashboard_link(self) -> str:
        return self.client.dashboard_link

    @property
    def job_ids(self) -> list[str]:
        """Batch-system ids of the jobs a dask-jobqueue cluster submitted (empty otherwise)."""
        workers = getattr(self.cluster, "workers", {}) or {}
        return sorted(str(j.job_id) for j in workers.values() if getattr(j, "job_id", None))

    def close(self, quiet=False):
        """Close the client, and the cluster if this connection started it.

        Parameters
        ----------
        quiet : bool
            Without distributed's log of the teardown (after an interrupt, where
            connections close under running tasks and every such event is logged).
        """
        _OPEN.discard(self)
        with quiet_logs() if quiet else contextlib.nullcontext():
            if quiet and self.cluster is not None and self.spec in EMBEDDED:
                # the worker processes write to this terminal too, and their own teardown
                # under running tasks is logged as errors (heartbeats cut off, data released)
                try:
                    self.client.run(_silence_this_process, callback_timeout=5)
                except Exception as e:  # noqa: BLE001 - closing goes on whatever the workers answer
                    logger.debug("quieting the workers before closing: %s", e)
            try:
                self.client.close()
            except Exception as e:
                if not quiet:
                    raise
                logger.debug("closing the client after an interrupt: %s", e)  # a timeout under load, a comm gone
            finally:
                if self.cluster is not None:
                    cluster, self.cluster = self.cluster, None
                    if quiet:
                        _close_after_interrupt(cluster)
                    else:
                        cluster.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # an interrupt (KeyboardInterrupt, a cancelled task): close without a word
        self.close(quiet=exc_type is not None and not issubclass(exc_type, Exception))

    def __repr__(self):
        return f"<daskptycho Connection {self.spec!r} scheduler={self.scheduler_address} dashboard={self.dashboard_link}>"


#: the connections made here and not closed yet (see :func:`close_all`)
_OPEN = weakref.WeakSet()


def close_all(quiet=False):
    """Close every :class:`Connection` made in this process and not closed yet.

    For the end of an interrupted program: an interrupt can arrive after a connection
    was made and before the code that made it was ready to close it (a context
    manager's ``__enter__`` not yet returned), which would leave the cluster to die with
    the process and its workers to log their lost scheduler.

    Parameters
    ----------
    quiet : bool
        As for :meth:`Connection.close`.
    """
    for conn in list(_OPEN):
        try:
            conn.close(quiet=quiet)
        except Exception as e:  # noqa: BLE001 - close the others whatever one does
            logger.debug("closing %r: %s", conn, e)


def security(tls=None, *, embedded=True):
    """The TLS settings to use, or None.

    Parameters
    ----------
    tls : bool, optional
        Use TLS (default: config ``daskptycho.cluster.tls``).
    embedded : bool
        The cluster and its workers are started here: without certificate files
        in the config a :meth:`Security.temporary` pair (in memory, this process
        and its children only) is made. A remote ``tls://`` scheduler and batch-job
        workers need the files.

    Returns
    -------
    distributed.security.Security or None
    """
    from distributed.security import Security

    if tls is None:
        tls = bool(config.get("cluster.tls", False))
    if not tls:
        return None
    files = {k: config.get(f"cluster.{k}") for k in ("tls-ca-file", "tls-cert", "tls-key")}
    given = {k: v for k, v in files.items() if v}
    if given:
        for k in files:
            if not files[k]:
                raise OptionsError(f"daskptycho.cluster.{k}", "TLS certificates need all of tls-ca-file, tls-cert and tls-key; "
                                   f"{k} is not set")
            if not os.path.isfile(files[k]):
                raise OptionsError(f"daskptycho.cluster.{k}", f"{files[k]} is not a file")
        ca, cert, key = files["tls-ca-file"], files["tls-cert"], files["tls-key"]
        return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, tls_scheduler_cert=cert, tls_scheduler_key=key,
                        tls_worker_cert=cert, tls_worker_key=key, require_encryption=True)
    if not embedded:
        raise OptionsError("tls", "TLS with a remote scheduler or batch-job workers needs certificate files: set "
                           "daskptycho.cluster.tls-ca-file, tls-cert and tls-key (e.g. DASK_DASKPTYCHO__CLUSTER__TLS_CERT=...)")
    try:
        return Security.temporary()
    except ImportError:
        raise OptionsError("tls", "temporary TLS certificates need the 'cryptography' package: pip install cryptography, "
                           "or give certificate files in daskptycho.cluster.tls-*") from None


def connect(spec="local", *, workers=None, jobs=None, scheduler_file=None, tls=None, memory_limit="auto", device=None):
    """Start or attach to a Dask cluster and return a :class:`Connection` (a context manager).

    Parameters
    ----------
    spec : str, optional
        ``"local"``, ``"cuda"``, ``"ucx"``, ``"slurm"``, ``"lsf"``, ``"pbs"`` (or another
        profile of ``cluster/jobqueue.yaml``), or a scheduler address
        (``tcp://host:port``, ``ucx://...``, ``tls://...``). None: config
        ``daskptycho.cluster.spec``.
    workers : int, optional
        Workers of an embedded cluster (``local``, ``ucx``: default the core count;
        ``cuda``: default one per GPU).
    jobs : int, optional
        Batch jobs to submit for ``slurm``/``lsf``/``pbs`` (default: config
        ``daskptycho.cluster.jobs``); each job brings the profile's ``processes`` workers.
    scheduler_file : str, optional
        Attach to the scheduler that wrote this file (``dask scheduler --scheduler-file``);
        overrides ``spec``.
    tls : bool, optional
        Authenticate and encrypt every connection (default: config
        ``daskptycho.cluster.tls``). Certificates come from the config's
        ``tls-ca-file``/``tls-cert``/``tls-key``, or for an embedded cluster from
        :meth:`distributed.security.Security.temporary`.
    memory_limit : str or int
        Per worker, for the embedded clusters.
    device : {"cpu", "gpu"}, optional
        Where the engines will keep arrays; ``cuda`` implies (and requires) ``"gpu"``.

    Returns
    -------
    Connection

    Raises
    ------
    OptionsError
        Unknown spec or bad TLS settings.
    DeviceError
        ``cuda`` without a usable GPU or dask-cuda; ``ucx`` without distributed-ucxx.
    ClusterError
        A batch system's workers did not arrive in time, or a scheduler is unreachable.
    """
    spec = check_connect(spec, workers=workers, jobs=jobs, scheduler_file=scheduler_file, tls=tls, device=device)
    if scheduler_file is not None:
        return _attach(None, scheduler_file, tls, device)
    spec = str(spec)
    if spec.startswith(_ADDRESS_PREFIXES):
        return _attach(spec, None, tls, device)
    if spec == "local":
        sec = security(tls)
        cluster = local_cluster(workers, memory_limit, security=sec)
        return _client(cluster, spec, device or "cpu", sec)
    if spec == "ucx":
        return _ucx(workers, memory_limit, tls, device)
    if spec == "cuda":
        return _cuda(workers, memory_limit, tls, device)
    return _jobqueue(spec, jobs, tls, device)


def check_connect(spec=None, *, workers=None, jobs=None, scheduler_file=None, tls=None, device=None):
    """Check the arguments of :func:`connect` without starting or reaching anything.

    What :func:`connect` would refuse is refused here, at once: an unknown spec, bad
    numbers, a missing scheduler file, TLS without what it needs, a GPU or package
    that is not there. A scheduler that does not answer, or batch jobs that never
    start, can only be found by :func:`connect` itself.

    Parameters
    ----------
    spec, workers, jobs, scheduler_file, tls, device
        As for :func:`connect`.

    Returns
    -------
    str
        The spec (config ``daskptycho.cluster.spec`` when ``spec`` is None).

    Raises
    ------
    OptionsError, DeviceError, ClusterError
        Naming the parameter at fault.
    """
    if spec is None:
        spec = config.get("cluster.spec", "local")
    if device not in (None, "cpu", "gpu"):
        raise OptionsError("device", f"got {device!r}; expected 'cpu' or 'gpu'")
    for name, value in (("workers", workers), ("jobs", jobs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise OptionsError(name, f"got {value!r}; expected an integer >= 1")
    if scheduler_file is not None:
        address = _scheduler_file_address(scheduler_file)
        if address.startswith("tls://") or tls:
            security(True, embedded=False)
        return spec
    spec = str(spec)
    if spec.startswith(_ADDRESS_PREFIXES):
        if spec.startswith("tls://") or tls:
            security(True, embedded=False)
        return spec
    tls_on = bool(tls) or (tls is None and bool(config.get("cluster.tls", False)))
    if spec in ("local", "ucx"):
        if spec == "ucx" and tls_on:
            raise OptionsError("tls", "UCX has no TLS; use cluster='local' with tls=True (TCP with TLS), or drop tls=True")
        if spec == "ucx" and not _ucxx_available():
            raise DeviceError("cluster='ucx' needs distributed-ucxx: pip install distributed-ucxx-cu12 (or use cluster='local')")
        if device == "gpu":
            from .backend import gpu_available

            if not gpu_available():
                raise DeviceError("device='gpu': there is no usable GPU on this machine (CuPy is missing or cupy.is_available() "
                                  "is False); use device='cpu'")
        return spec
    if spec == "cuda":
        if device == "cpu":
            raise OptionsError("device", "cluster='cuda' runs the engines on GPUs; drop device='cpu' or use cluster='local'")
        from .backend import gpu_available

        if not gpu_available():
            raise DeviceError("cluster='cuda': there is no usable GPU on this machine (CuPy is missing or cupy.is_available() "
                              "is False); use cluster='local'")
        try:
            import dask_cuda  # noqa: F401
        except Exception as e:
            raise DeviceError(f"cluster='cuda' needs dask-cuda ({type(e).__name__}: {e}): pip install 'dask-cuda[cu12]', "
                              "or use cluster='local'") from None
        return spec
    profiles = jobqueue_profiles()
    if spec in profiles or spec in BATCH_SYSTEMS:
        import shutil

        system = str(profiles.get(spec, {}).get("system") or spec)
        submit = {"slurm": "sbatch", "lsf": "bsub", "pbs": "qsub"}.get(system)
        if submit and not shutil.which(submit):
            raise ClusterError(f"cluster={spec!r}: {submit} is not on PATH: run on a {system.upper()} login node (or start "
                               "one: cluster/ci/slurm-up.sh), or use cluster='local'", parameter="cluster")
        return spec
    choices = list(EMBEDDED) + sorted(set(BATCH_SYSTEMS) | set(profiles)) + ["tcp://HOST:PORT", "ucx://HOST:PORT", "tls://HOST:PORT"]
    raise OptionsError("cluster", f"unknown cluster {spec!r}; expected one of {', '.join(choices)} (or scheduler_file=...)")


def _scheduler_file_address(scheduler_file):
    """The scheduler address a scheduler file holds."""
    if not os.path.isfile(scheduler_file):
        raise OptionsError("scheduler_file", f"{scheduler_file} does not exist (the scheduler writes it once it is up)")
    try:
        with open(scheduler_file) as f:
            return str(json.load(f)["address"])
    except (OSError, ValueError, KeyError, TypeError):
        raise OptionsError("scheduler_file", f"{scheduler_file} is not a Dask scheduler file (JSON with an 'address')") from None


def _client(cluster, spec, device, sec):
    """A Client of a cluster started here; the cluster is closed if the client fails."""
    from distributed import Client

    try:
        client = Client(cluster, security=sec)
    except Exception:
        cluster.close()
        raise
    except BaseException:
        _close_after_interrupt(cluster)
        raise
    return Connection(client, cluster, spec=spec, device=device, security=sec)


def _attach(address, scheduler_file, tls, device):
    """Attach to a running scheduler, by address or scheduler file; never closes it."""
    from distributed import Client

    what = address if scheduler_file is None else _scheduler_file_address(scheduler_file)
    use_tls = what.startswith("tls://") or bool(tls)
    sec = security(True, embedded=False) if use_tls else None
    timeout = config.get("cluster.connect-timeout", 30)
    logger.info("connecting to the scheduler at %s ...", what)
    try:
        if scheduler_file is not None:
            client = Client(scheduler_file=scheduler_file, security=sec, timeout=timeout)
        else:
            client = Client(address, security=sec, timeout=timeout)
    except (OSError, TimeoutError) as e:
        given = f"scheduler_file={scheduler_file!r}" if scheduler_file is not None else f"cluster={address!r}"
        raise ClusterError(f"{given}: cannot reach the scheduler at {what} within {timeout} s ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no reply'})",
                           parameter="scheduler_file" if scheduler_file is not None else "cluster") from None
    return Connection(client, None, spec=address or "scheduler-file", device=device or "cpu", security=sec)


def _ucxx_available():
    import importlib

    try:
        importlib.import_module("distributed_ucxx")
    except Exception:  # ImportError, or a native library that fails to load
        return False
    return True


def _ucx(workers, memory_limit, tls, device):
    # (checked by check_connect: no TLS, distributed-ucxx installed)
    # loopback TCP through UCX unless the user chose transports; quiet UCX's warning
    # about the DASK_/UCX_ variables it does not know
    os.environ.setdefault("UCX_TLS", "tcp")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    cluster = local_cluster(workers, memory_limit, protocol="ucx")
    return _client(cluster, "ucx", device or "cpu", None)


def _cuda(workers, memory_limit, tls, device):
    # (checked by check_connect: not device='cpu', a usable GPU, dask-cuda importable)
    from dask_cuda import LocalCUDACluster

    sec = security(tls)
    if sec is not None:
        protocol = "tls://"
    elif _ucxx_available():
        protocol = "ucx"
    else:
        protocol = "tcp"
        _once("distributed-ucxx is not installed: the cuda cluster's workers talk TCP "
              "(pip install distributed-ucxx-cu12 for UCX/NVLink)")
    kw = {"n_workers": workers} if workers else {}
    logger.info("starting %s (LocalCUDACluster, %s on 127.0.0.1) ...",
                f"{workers} GPU worker{'' if workers == 1 else 's'}" if workers else "one worker per GPU", protocol.rstrip(":/").upper())
    try:
        cluster = _start(lambda: LocalCUDACluster(protocol=protocol, security=sec, threads_per_worker=1, host="127.0.0.1",
                                                  dashboard_address="127.0.0.1:0", memory_limit=memory_limit, silence_logs=40, **kw))
    except Exception as e:  # pynvml and CUDA errors surface here on a machine without a usable GPU
        raise DeviceError(f"cluster='cuda': dask-cuda could not start GPU workers ({type(e).__name__}: {e}); "
                          "use cluster='local'") from None
    return _client(cluster, "cuda", "gpu", sec)


def _once(message):
    if message not in _told:
        _told.add(message)
        logger.warning(message)


# ----------------------------------------------------------------------------- batch systems


def jobqueue_file():
    """The profiles file: config ``daskptycho.cluster.jobqueue-file``, else ``cluster/jobqueue.yaml``
    of the source tree (None when neither exists, e.g. an installed wheel)."""
    path = config.get("cluster.jobqueue-file")
    if path:
        if not os.path.isfile(path):
            raise OptionsError("daskptycho.cluster.jobqueue-file", f"{path} is not a file")
        return path
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster", "jobqueue.yaml")
    return here if os.path.isfile(here) else None


def jobqueue_profiles(path=None):
    """The dask-jobqueue profiles of ``cluster/jobqueue.yaml``: ``{name: {key: value}}``.

    Each profile holds dask-jobqueue keys (as in dask-jobqueue's own
    ``jobqueue.yaml``) and optionally ``system`` (slurm, lsf or pbs; default: the
    profile's name).
    """
    import yaml

    path = path or jobqueue_file()
    if path is None:
        return {}
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise OptionsError("daskptycho.cluster.jobqueue-file", f"cannot read {path}: {e}") from None
    profiles = doc.get("jobqueue", {}) if isinstance(doc, dict) else {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise OptionsError("daskptycho.cluster.jobqueue-file", f"{path}: expected 'jobqueue:' mapping profile names to settings")
    return copy.deepcopy(profiles)


def jobqueue_cluster(profile, *, security=None, path=None, **overrides):
    """A dask-jobqueue cluster (not yet scaled) from a profile of ``cluster/jobqueue.yaml``.

    Keys the profile leaves out fall back to dask-jobqueue's configuration for its
    batch system (``jobqueue.<system>`` in dask.config, e.g. a site's
    ``~/.config/dask/jobqueue.yaml``). The scheduler's dashboard listens on
    127.0.0.1 (a free port) unless the profile's ``scheduler-options`` say otherwise.

    Parameters
    ----------
    profile : str
        A profile name (``slurm``, ``lsf``, ``pbs``, ``slurm-gpu`` ...).
    security : distributed.security.Security, optional
    path : str, optional
        Profiles file (default :func:`jobqueue_file`).
    **overrides
        dask-jobqueue keyword arguments that win over the profile.

    Returns
    -------
    dask_jobqueue.JobQueueCluster
        Call ``.job_script()`` to see what would be submitted, ``.scale(jobs=N)`` to submit.
    """
    profiles = jobqueue_profiles(path)
    settings = profiles.get(profile, {})
    system = settings.pop("system", profile)
    if system not in BATCH_SYSTEMS:
        raise OptionsError("cluster", f"profile {profile!r} names batch system {system!r}; expected one of {', '.join(BATCH_SYSTEMS)}")
    try:
        import dask_jobqueue
    except ImportError:
        raise OptionsError("cluster", f"cluster={profile!r} needs dask-jobqueue: pip install dask-jobqueue") from None
    kwargs = {}
    for key, value in settings.items():
        key = key.replace("-", "_")
        kwargs["job_name" if key == "name" else key] = value
    kwargs.update(overrides)
    sched = dict(kwargs.pop("scheduler_options", None) or {})
    if not any(k in sched for k in ("dashboard_address", "dashboard-address")):
        sched["dashboard_address"] = "127.0.0.1:0"
    cls = getattr(dask_jobqueue, BATCH_SYSTEMS[system])
    try:
        return cls(scheduler_options=sched, security=security, config_name=system, **kwargs)
    except (TypeError, ValueError) as e:
        raise OptionsError("cluster", f"profile {profile!r} of {path or jobqueue_file()}: {e}") from None


def _jobqueue(profile, jobs, tls, device):
    from distributed import Client

    if jobs is None:
        jobs = int(config.get("cluster.jobs", 1))
    if jobs < 1:
        raise OptionsError("jobs", f"got {jobs}; expected >= 1")
    system = str(jobqueue_profiles().get(profile, {}).get("system") or profile)
    # workers on other nodes must be given the certificate: files, not in-memory temporary ones
    sec = security(tls, embedded=False)
    cluster = jobqueue_cluster(profile, security=sec)
    timeout = float(config.get("cluster.worker-timeout", 300))
    try:
        if system == "slurm":
            _slurm_test_only(cluster, profile)
        logger.info("submitting %d %s job%s (profile %s); waiting up to %g s for the workers ...", jobs, system.upper(),
                    "" if jobs == 1 else "s", profile, timeout)
        cluster.scale(jobs=jobs)
        per_job = int(getattr(cluster._dummy_job, "worker_processes", 1) or 1)
        client = Client(cluster, security=sec)
        try:
            client.wait_for_workers(jobs * per_job, timeout=timeout)
        except TimeoutError:
            got = len(client.nthreads())
            ids = ", ".join(str(j.job_id) for j in cluster.workers.values() if getattr(j, "job_id", None)) or "none"
            client.close()
            raise ClusterError(f"cluster={profile!r}: {got} of {jobs * per_job} {system.upper()} workers joined within {timeout:g} s "
                               f"(job ids: {ids}); the jobs may still be queued or failed to start: see the batch system's "
                               "queue and job logs, or raise daskptycho.cluster.worker-timeout", parameter="cluster") from None
    except BaseException:
        _close_quietly(cluster)
        raise
    conn = Connection(client, cluster, spec=profile, device=device or "cpu", security=sec)
    logger.info("%s job(s) %s: %d worker(s), scheduler %s, dashboard %s", system.upper(), " ".join(conn.job_ids), jobs * per_job,
                conn.scheduler_address, conn.dashboard_link)
    return conn


def _slurm_test_only(cluster, profile):
    """Ask SLURM whether it would run the worker job (``sbatch --test-only``): a request no
    node can satisfy fails here, with SLURM's reason, instead of as a timeout."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="daskptycho-job-") as f:
        f.write(cluster.job_script())
        f.flush()
        r = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        reason = " ".join(ln.removeprefix("sbatch: error: ") for ln in r.stderr.strip().splitlines()[-2:]) or f"exit status {r.returncode}"
        raise ClusterError(f"cluster={profile!r}: SLURM refuses the worker job ({reason}); edit profile {profile!r} in "
                           f"{jobqueue_file()} (cores, memory, queue, account)", parameter="cluster")


def _close_quietly(cluster):
    """Close a cluster that failed to start; its own errors must not hide the reason it failed."""
    try:
        cluster.close()
    except Exception as e:  # e.g. jobs that were never submitted
        logger.debug("closing the failed cluster: %s", e)
