"""The one exception hierarchy of daskptycho.

Every error a user can cause derives from :class:`DaskptychoError`, so the command
line can turn it into one readable line and exit status 2, and library users can
catch one class.
"""

from __future__ import annotations


class DaskptychoError(Exception):
    """Base class of every error daskptycho raises on purpose."""


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


class OptionsError(DaskptychoError, ValueError):
    """An option passed to an engine, the simulator or the command line is invalid."""

    def __init__(self, option: str, problem: str):
        self.option = option
        self.problem = problem
        super().__init__(f"option {option!r}: {problem}")


class OutputExistsError(DaskptychoError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class DeviceError(DaskptychoError, RuntimeError):
    """An accelerator (GPU, CuPy, dask-cuda, UCX) was asked for but is not usable here."""
