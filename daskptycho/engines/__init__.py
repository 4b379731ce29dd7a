"""Reconstruction engines and the public :func:`reconstruct` entry point."""

from __future__ import annotations

import json
import os
import time

from .. import config as _config
from ..io.store import validate_dataset
from ..options import check_options
from .problem import ENGINES, ReconstructOptions, prepare, result_dataset

__all__ = ["reconstruct", "ReconstructOptions", "ENGINES"]


def reconstruct(ds, engine=None, *, client=None, progress=None, options=None, report=None, cluster=None, cluster_options=None, **kwargs):
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
        For the distributed engines; without one a cluster is started (or attached
        to) by :func:`daskptycho.connect` from ``cluster``.
    cluster : str, optional
        Without a client: the :func:`daskptycho.connect` spec (``local``, ``cuda``,
        ``ucx``, ``slurm``, ``lsf``, ``pbs``, a scheduler address; default config
        ``daskptycho.cluster.spec``). ``cuda`` implies ``device="gpu"``.
    cluster_options : dict, optional
        More :func:`daskptycho.connect` keywords: ``jobs``, ``scheduler_file``, ``tls``,
        ``memory_limit``.
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
    if client is None and (cluster or _config.get("cluster.spec")) == "cuda" and "device" not in kwargs and options is None:
        kwargs["device"] = "gpu"  # a cuda cluster's workers hold CuPy arrays
    opts = check_options(ReconstructOptions, options, kwargs)
    conn = {"cluster": cluster, "device": opts.device, **(cluster_options or {})}
    problem = prepare(ds, opts)
    meta = _checkpoint_start(opts)
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
        with Driver(client, workers=opts.workers or 1, report=report, **conn) as drv:
            from .ml import ml_checkpoints

            init, start, done, after = ml_checkpoints(drv, problem, meta)
            state, costs, memory = drv.run_sequential(
                load, partial(_ml_step, problem=problem), init or partial(ml_init, problem), opts.iterations, progress,
                start=start, costs=done, after=after,
            )
        obj, probe = state["object"], state["probe"]
        extra = {"memory": json.dumps(memory)}
    elif opts.engine in ("gd", "hve"):
        from .driver import TileDriver

        source = ds.attrs.get("source")
        with TileDriver(client, workers=opts.workers, report=report, **conn) as drv:
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
            "recoveries": json.dumps(info["recoveries"]),
        }
    else:  # dm
        return _reconstruct_dm(ds, problem, opts, client, report, progress, t0, conn)
    extra["wall_time_s"] = time.perf_counter() - t0
    if meta is not None:
        extra["resumed_from_iteration"] = int(meta["completed"])
    return result_dataset(problem, obj, probe, costs, ds, extra)


def _checkpoint_start(opts):
    """Before a run with checkpoints: a fresh run drops older checkpoints of its store;
    a resumed one gets the latest checkpoint, checked against its options."""
    import dataclasses

    if not opts.checkpoint:
        return None
    from ..io.checkpoint import Checkpoint, check_resume

    ck = Checkpoint(opts.checkpoint)
    if not opts.resume:
        ck.clear()
        return None
    meta = ck.latest()
    check_resume(meta, dataclasses.asdict(opts), opts.engine, opts.checkpoint)
    if not opts.checkpoint_every:  # go on checkpointing as the interrupted run did
        opts.checkpoint_every = int(meta["options"].get("checkpoint_every") or 0)
    ck.prune()
    return meta


def _reconstruct_dm(ds, problem, opts, client, report, progress, t0, conn=None):
    """The dm engine, with ``probe_modes='auto'`` growing the modes until the weakest
    carries under 1% of the power (the paper's recipe); the last run whose modes all
    carry at least 1% is kept."""
    import dataclasses

    import numpy as np

    from .dm import run_dm
    from .driver import TileDriver

    auto = opts.probe_modes == "auto"
    tried = []
    with TileDriver(client, workers=opts.workers, report=report, **(conn or {})) as drv:
        source = ds.attrs.get("source")
        if not (source and os.path.isdir(source)):
            from .ml import load_patterns

            source = drv.client.scatter(load_patterns(ds), hash=False)
        best = None
        for m in range(1, 9) if auto else [None]:
            if auto:
                p = prepare(ds, dataclasses.replace(opts, probe_modes=m))
            else:
                p = problem
            run = run_dm(drv, p, source, progress)
            weakest = float(np.min(run[3]["fractions"]))
            tried.append({"modes": int(p.probe.shape[0]), "weakest_fraction": weakest, "final_cost": run[2][-1]})
            if auto and m > 1 and weakest < 0.01:
                break
            best = (p, run)
    problem, (obj, probe, costs, info) = best
    n_it = len(costs)
    extra_vars = {
        "probe_change": (("iteration", "mode"), info["probe_change"].reshape(n_it, -1), {"units": "1", "long_name": "relative change of each probe mode (eq. 7)"}),
        "object_change": (("iteration",), info["object_change"], {"units": "1", "long_name": "relative change of the object (eq. 7)"}),
    }
    if obj.shape[0] > 1:
        extra_vars["object_modes"] = (("omode", "y", "x"), obj, {"units": "1", "long_name": "object modes"})
    extra = {
        "memory": json.dumps(info["memory"]),
        "partitions": len(info["partitions"]),
        "fourier_error_relative_final": float(costs[-1] / max(problem.mean_counts * problem.n_positions, 1e-30)),
        "probe_modes_tried": json.dumps(tried),
        "recoveries": json.dumps(info["recoveries"]),
        "wall_time_s": time.perf_counter() - t0,
    }
    if info["resumed_from"] is not None:
        extra["resumed_from_iteration"] = info["resumed_from"]
    out = result_dataset(problem, obj[:1], probe, costs, ds, extra, extra_vars)
    out["cost"].attrs["long_name"] = "Fourier error sum (sqrt(I_model) - sqrt(I))^2 of the model entering each iteration"
    return out


def _identity(x):
    return x


def _ml_step(state, data, it, problem):
    from .ml import ml_step

    return ml_step(state, data, it, problem)
