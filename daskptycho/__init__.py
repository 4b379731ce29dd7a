"""daskptycho: ptychographic reconstruction on Dask clusters."""

from . import config  # noqa: F401  (registers the dask.config defaults)
from .cluster import connect
from .engines import DMOptions, EngineOptions, GDOptions, HVEOptions, MLOptions, engine_options, reconstruct
from .errors import DaskptychoError, DatasetError, OptionsError
from .io import build_dataset, open_dataset, open_result, open_writer, write_dataset, write_result
from .simulate import SimulationOptions, simulate, simulate_stream
from .version import __version__

__all__ = [
    "__version__", "connect", "reconstruct", "engine_options", "EngineOptions", "GDOptions", "MLOptions", "HVEOptions",
    "DMOptions", "build_dataset", "open_dataset", "open_result", "write_dataset", "write_result", "simulate",
    "simulate_stream", "open_writer", "SimulationOptions", "DaskptychoError", "DatasetError", "OptionsError",
]
