"""daskptycho: ptychographic reconstruction on Dask clusters."""

from . import config  # noqa: F401  (registers the dask.config defaults)
from .cluster import connect
from .engines import DMOptions, EngineOptions, GDOptions, HVEOptions, MLOptions, engine_options
from .engines import reconstruct as _reconstruct
from .errors import DaskptychoError, DatasetError, OptionsError
from .follow import follow
from .follow import follow as _follow
from .io import build_dataset, open_dataset, open_result, open_writer, write_dataset, write_result
from .simulate import SimulationOptions, simulate, simulate_stream
from .version import __version__

__all__ = [
    "__version__", "connect", "reconstruct", "follow", "engine_options", "EngineOptions", "GDOptions", "MLOptions", "HVEOptions",
    "DMOptions", "build_dataset", "open_dataset", "open_result", "write_dataset", "write_result", "simulate",
    "simulate_stream", "open_writer", "SimulationOptions", "DaskptychoError", "DatasetError", "OptionsError",
]


def reconstruct(ds, engine=None, *, follow=False, **kwargs):
    """Reconstruct an object (and probe) from a dataset; with ``follow=True``, from a store
    still being written (:func:`daskptycho.follow`, which takes ``iterations_after``,
    ``round_iterations``, ``start_frames``, ``timeout_s`` besides).

    Every other parameter is :func:`daskptycho.engines.reconstruct`'s (its docstring
    below).
    """
    if follow:
        if hasattr(ds, "data_vars"):
            raise OptionsError("follow", "needs the store's path (the frames are read as they are committed), not an opened dataset")
        return _follow(ds, engine, **kwargs)
    return _reconstruct(ds, engine, **kwargs)


reconstruct.__doc__ += "\n" + (_reconstruct.__doc__ or "")
