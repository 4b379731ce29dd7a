"""The one exception hierarchy of daskptycho.

Every error a user can cause derives from :class:`DaskptychoError`, so the command
line can turn it into one readable line and exit status 2, and library users can
catch one class.

Library messages speak Python: an error about a keyword argument names it
(``overwrite=True``, ``cluster='local'``) and carries it in ``parameter``; the
command line renders those names as its flags (``--overwrite``, ``--cluster local``).
"""

from __future__ import annotations


class DaskptychoError(Exception):
    """Base class of every error daskptycho raises on purpose.

    Attributes
    ----------
    parameter : str or None
        The keyword argument (of :func:`daskptycho.reconstruct`, :func:`daskptycho.connect`,
        a writer ...) the error concerns, if any; the command line names the matching flag.
    """

    parameter: str | None = None


class DatasetError(DaskptychoError, ValueError):
    """A dataset store is missing something or holds something invalid.

    Parameters
    ----------
    field : str
        The variable, attribute or coordinate at fault (e.g. ``"intensity"``,
        ``"attrs.energy_eV"``).
    problem : str
        What is wrong and what is expected instead.
    """

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")

    def __reduce__(self):  # raised in worker tasks too: must survive pickling
        return (type(self), (self.field, self.problem))


class OptionsError(DaskptychoError, ValueError):
    """An option passed to an engine, the simulator, a cluster or the command line is invalid.

    Parameters
    ----------
    option : str
        The keyword argument at fault (``"tiles"``, ``"workers"``), or a config key
        (``"daskptycho.cluster.tls-cert"``); also available as ``parameter``.
    problem : str
        What is wrong and what is expected instead.
    """

    def __init__(self, option: str, problem: str):
        self.option = option
        self.problem = problem
        super().__init__(f"option {option!r}: {problem}")

    @property
    def parameter(self):
        return self.option

    def __reduce__(self):
        return (type(self), (self.option, self.problem))


class OutputExistsError(DaskptychoError, FileExistsError):
    """The output path exists and overwriting was not asked for.

    Parameters
    ----------
    message : str
        The path and what to do (``pass overwrite=True to replace it``).
    parameter : str
        The keyword argument that allows replacing it (default ``"overwrite"``).
    """

    def __init__(self, message: str, parameter: str = "overwrite"):
        self.parameter = parameter
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.parameter))


class DeviceError(DaskptychoError, RuntimeError):
    """An accelerator (GPU, CuPy, dask-cuda, UCX) was asked for but is not usable here."""


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


class PeerExchangeError(DaskptychoError, RuntimeError):
    """A message between two workers' stages (``daskptycho.schedule.exchange: peer``) did
    not arrive: its run was aborted (a lost worker, an error in another stage), or it took
    longer than ``daskptycho.schedule.peer_timeout_s``."""


class StreamStalledError(DaskptychoError, TimeoutError):
    """A growing dataset store stopped changing: its writer neither committed frames nor
    sent a heartbeat within the reader's timeout (or the store never appeared).

    Parameters
    ----------
    message : str
        The store, how many frames are committed and what can be done with them.
    state : daskptycho.io.stream.StreamState
        The last state read (``frames_complete`` frames stay readable).
    """

    def __init__(self, message: str, state=None):
        self.state = state
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.state))
