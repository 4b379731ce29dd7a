"""Reconstruction engines and the public :func:`reconstruct` entry point."""

from __future__ import annotations

import json
import os
import time

from ..io.store import validate_dataset
from ..options import check_options
from .problem import ENGINES, ReconstructOptions, prepare, result_dataset

__all__ = ["reconstruct", "ReconstructOptions", "ENGINES"]


def reconstruct(ds, engine=None, *, client=None, progress=None, options=None, report=None, **kwargs):
    """Reconstruct an object (and probe) from a dataset.

    Parameters
    ----------
    ds : xarray.Dataset or str
        A dataset in the daskptycho format (from :func:`daskptycho.open_dataset`) or
        the path of its store.
    engine : {"gd", "ml", "hve"}
        ``gd`` (default): image gradient decomposition over ``tiles`` pinned to
        workers; ``ml``: the single-task reference (maximum-likelihood gradient
        descent); ``hve``: the Halo Voxel Exchange baseline.
    client : distributed.Client, optional
        For the distributed engines; without one an embedded LocalCluster is started.
    progress : callable(iteration, cost), optional
        Called after every iteration.
    report : str, optional
        Write a Dask performance report (HTML, with the task timeline) of the run.
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
        from functools import partial

        from .driver import Driver
        from .ml import load_patterns, load_patterns_from_store, ml_init

        source = ds.attrs.get("source")
        if source and os.path.isdir(source):
            load = partial(load_patterns_from_store, source)  # the worker reads the store itself
        else:
            load = partial(_identity, load_patterns(ds))
        with Driver(client, workers=opts.workers or 1, report=report) as drv:
            state, costs, memory = drv.run_sequential(
                load, partial(_ml_step, problem=problem), partial(ml_init, problem), opts.iterations, progress
            )
        obj, probe = state["object"], state["probe"]
        extra = {"memory": json.dumps(memory)}
    elif opts.engine in ("gd", "hve"):
        from .driver import TileDriver

        source = ds.attrs.get("source")
        with TileDriver(client, workers=opts.workers, report=report) as drv:
            if not (source and os.path.isdir(source)):
                from .ml import load_patterns

                source = drv.client.scatter(load_patterns(ds), hash=False)
            if opts.engine == "gd":
                from .gd import run_gd as run
            else:
                from .hve import run_hve as run
            obj, probe, costs, info = run(drv, problem, source, progress)
        t = info["tiling"]
        extra = {
            "tiles": f"{t.rows}x{t.cols}",
            "halo_px": list(t.halo),
            "tile_cores": json.dumps({f"{x.row},{x.col}": list(map(int, x.core)) for x in t}),
            "tile_extended": json.dumps({f"{x.row},{x.col}": list(map(int, x.extended)) for x in t}),
            "memory": json.dumps(info["memory"]),
        }
    else:
        from ..errors import OptionsError

        raise OptionsError("engine", f"{opts.engine!r} is not available yet in this version; use 'ml', 'gd' or 'hve'")
    extra["wall_time_s"] = time.perf_counter() - t0
    return result_dataset(problem, obj, probe, costs, ds, extra)


def _identity(x):
    return x


def _ml_step(state, data, it, problem):
    from .ml import ml_step

    return ml_step(state, data, it, problem)
