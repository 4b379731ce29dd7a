"""Reconstruction engines and the public :func:`reconstruct` entry point.

Each engine is one module (its options class and its run on the shared skeleton of
:mod:`.run`) and one entry of :data:`~.registry.ENGINES`; :func:`reconstruct` looks
the engine up, prepares the problem, connects (the :class:`~.driver.Driver`), runs it
and assembles the result.
"""

from __future__ import annotations

import dataclasses
import os
import time

from .. import config
from ..cluster import check_connect
from ..errors import OptionsError
from ..io.checkpoint import Checkpoint, check_resume
from ..io.patterns import load_patterns
from ..io.store import open_dataset, validate_dataset
from .dm import DMOptions
from .driver import Driver
from .gd import GDOptions
from .hve import HVEOptions
from .ml import MLOptions
from .options import EngineOptions
from .problem import prepare, result_dataset
from .registry import ENGINES, engine_options

__all__ = ["reconstruct", "engine_options", "ENGINES", "EngineOptions", "GDOptions", "MLOptions", "HVEOptions", "DMOptions"]


def reconstruct(ds, engine=None, *, client=None, progress=None, options=None, report=None, cluster=None, cluster_options=None,
                start=None, **kwargs):
    """Reconstruct an object (and probe) from a dataset.

    Parameters
    ----------
    ds : xarray.Dataset or str
        A dataset in the daskptycho format (from :func:`daskptycho.open_dataset`) or
        the path of its store.
    engine : {"gd", "ml", "hve", "dm"}
        ``gd`` (default, config ``daskptycho.reconstruct.engine``): image gradient
        decomposition over ``tiles`` pinned to workers; ``ml``: the single-task
        reference (maximum-likelihood gradient descent); ``hve``: the Halo Voxel
        Exchange baseline; ``dm``: the multi-mode difference map.
    client : distributed.Client, optional
        Without one a cluster is started (or attached to) by :func:`daskptycho.connect`
        from ``cluster``.
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
    options : dict or EngineOptions, optional
    start : xarray.Dataset, optional
        An earlier result (of the same data, or of part of it) to start from: its object,
        placed on this run's grid by its coordinates (ones where it has none), and its
        probe. :func:`daskptycho.follow` starts each round this way.
    **kwargs
        The engine's options (:class:`GDOptions`, :class:`MLOptions`, :class:`HVEOptions`,
        :class:`DMOptions`): ``iterations``, ``batch_size`` (None = full batch),
        ``slices``, ``slice_thickness_m``, ``refine_probe``, ``probe_modes``, ``tiles`` ...

    Returns
    -------
    xarray.Dataset
        ``object`` (slice, y, x) complex64 on the data's coordinates (pixel
        centres, metres), ``probe`` (mode, py, px), ``cost`` (iteration), and
        attributes recording the engine, every option, the version and the input.
    """
    if not hasattr(ds, "data_vars"):
        ds = open_dataset(ds)
    else:
        validate_dataset(ds, check_values=False)
    if engine is not None:
        kwargs["engine"] = engine
    if client is None and (cluster or config.get("cluster.spec")) == "cuda" and "device" not in kwargs and options is None:
        kwargs["device"] = "gpu"  # a cuda cluster's workers hold CuPy arrays
    opts = engine_options(options, **kwargs)
    if client is None:  # what connect would refuse, refused before the dataset is read
        known = ("jobs", "scheduler_file", "tls")
        check_connect(cluster, workers=opts.workers, device=opts.device,
                      **{k: v for k, v in (cluster_options or {}).items() if k in known})
    if start is not None and opts.resume:
        raise OptionsError("start", "and resume both give the starting state: pass one of them")
    if start is not None and getattr(opts, "probe_modes", None) == "auto":
        raise OptionsError("start", "fixes the probe modes; probe_modes='auto' chooses them: pass probe_modes as a number")
    problem = prepare(ds, opts, start)
    meta = _checkpoint_start(opts)
    t0 = time.perf_counter()
    with Driver(client, workers=opts.workers, report=report, cluster=cluster, device=opts.device, **(cluster_options or {})) as drv:
        source = ds.attrs.get("source")
        if not (source and os.path.isdir(source)):  # never written: the patterns go to one worker
            source = drv.client.scatter(load_patterns(ds), hash=False)
        problem, out = ENGINES[opts.engine].run(drv, ds, problem, source, progress)
    attrs = dict(out.attrs, wall_time_s=time.perf_counter() - t0)
    if meta is not None:
        attrs["resumed_from_iteration"] = int(meta["completed"])
    res = result_dataset(problem, out.object, out.probe, out.costs, ds, attrs, out.variables)
    if out.cost_name:
        res["cost"].attrs["long_name"] = out.cost_name
    return res


def _checkpoint_start(opts):
    """Before a run with checkpoints: a fresh run drops older checkpoints of its store;
    a resumed one gets the latest checkpoint, checked against its options."""
    if not opts.checkpoint:
        return None
    ck = Checkpoint(opts.checkpoint)
    if not opts.resume:
        ck.clear()
        return None
    meta = ck.latest()
    check_resume(meta, dataclasses.asdict(opts), opts.engine, opts.checkpoint,
                 defaults=dataclasses.asdict(engine_options(engine=opts.engine)))
    if not opts.checkpoint_every:  # go on checkpointing as the interrupted run did
        opts.checkpoint_every = int(meta["options"].get("checkpoint_every") or 0)
    ck.prune()
    return meta
