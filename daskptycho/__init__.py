"""daskptycho: ptychographic reconstruction on Dask clusters."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("daskptycho")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

from . import config  # noqa: F401  (registers the dask.config defaults)
from .cluster import connect
from .engines import ReconstructOptions, reconstruct
from .errors import DaskptychoError, DatasetError, OptionsError
from .io import build_dataset, open_dataset, open_result, write_dataset, write_result
from .simulate import SimulationOptions, simulate

__all__ = [
    "__version__", "connect", "reconstruct", "ReconstructOptions", "build_dataset", "open_dataset", "open_result",
    "write_dataset", "write_result", "simulate", "SimulationOptions",
    "DaskptychoError", "DatasetError", "OptionsError",
]
