"""Reconstruction engines and the public :func:`reconstruct` entry point."""

from __future__ import annotations

import time

from ..io.store import validate_dataset
from ..options import check_options
from .problem import ENGINES, ReconstructOptions, prepare, result_dataset

__all__ = ["reconstruct", "ReconstructOptions", "ENGINES"]


def reconstruct(ds, engine=None, *, client=None, progress=None, options=None, **kwargs):
    """Reconstruct an object (and probe) from a dataset.

    Parameters
    ----------
    ds : xarray.Dataset or str
        A dataset in the daskptycho format (from :func:`daskptycho.open_dataset`) or
        the path of its store.
    engine : {"ml", "gd", "hve", "dm"}
        ``ml``: the single-task reference (maximum-likelihood gradient descent).
    client : distributed.Client, optional
        For the distributed engines; without one an embedded LocalCluster is started.
    progress : callable(iteration, cost), optional
        Called after every iteration.
    options : dict or ReconstructOptions, optional
    **kwargs
        Options (see :class:`ReconstructOptions`): ``iterations``, ``batch_size``
        (None = full batch), ``slices``, ``slice_thickness_m``, ``refine_probe``,
        ``probe_modes``, ``seed`` ...

    Returns
    -------
    xarray.Dataset
        ``object`` (slice, y, x) complex64 on the data's coordinates (pixel
        centres, metres), ``probe`` (mode, py, px), ``cost`` (iteration), and
        attributes recording the engine, every option, the version and the input.
    """
    from ..io.store import open_dataset

    if not hasattr(ds, "data_vars"):
        ds = open_dataset(ds)
    else:
        validate_dataset(ds, check_values=False)
    if engine is not None:
        kwargs["engine"] = engine
    opts = check_options(ReconstructOptions, options, kwargs)
    problem = prepare(ds, opts)
    t0 = time.perf_counter()
    if opts.engine == "ml":
        from .ml import load_patterns, run_ml

        obj, probe, costs = run_ml(problem, load_patterns(ds), progress=progress)
        extra = {}
    else:
        from ..errors import OptionsError

        raise OptionsError("engine", f"{opts.engine!r} is not available yet in this version; use 'ml'")
    extra["wall_time_s"] = time.perf_counter() - t0
    return result_dataset(problem, obj, probe, costs, ds, extra)
