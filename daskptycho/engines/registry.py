"""The engines: one entry each, with its options and its run, so :func:`reconstruct` is
a lookup and a new engine is one module (its options class, its run) and one line here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from .. import config
from ..errors import OptionsError
from ..options import merged, unknown_option
from . import dm, gd, hve, ml
from .options import EngineOptions


@dataclass(frozen=True)
class Engine:
    """An engine.

    Attributes
    ----------
    name : str
    options : type, its :class:`~daskptycho.engines.options.EngineOptions` subclass
    run : callable(drv, ds, problem, source, progress) -> (problem, RunOutput)
        Runs on the driver's cluster; returns the problem it solved (dm's automatic
        modes prepare others) and the :class:`~daskptycho.engines.run.RunOutput`.
    summary : str, one line for listings
    """

    name: str
    options: type
    run: Callable
    summary: str


ENGINES = {e.name: e for e in (
    Engine("gd", gd.GDOptions, gd.run, "image gradient decomposition: tiles pinned to workers, strip passes between them"),
    Engine("ml", ml.MLOptions, ml.run, "the reference: maximum-likelihood gradient descent on the whole object in one task"),
    Engine("hve", hve.HVEOptions, hve.run, "the Halo Voxel Exchange baseline: tiles with every neighbouring position, halos pasted"),
    Engine("dm", dm.DMOptions, dm.run, "the multi-mode difference map: parts of the scan pinned to workers, reductions"),
)}


def engine_options(options=None, **overrides):
    """The options of the engine named by ``engine`` (config ``daskptycho.reconstruct.engine``
    when not given), built from ``options`` (an options instance or a dict) and keywords.

    Raises
    ------
    OptionsError
        An unknown engine; a key this engine does not take (naming the engines that
        do, or the closest known key); a value against its rule.
    """
    base = merged(options, overrides, EngineOptions)
    name = base.get("engine")
    if name is None:
        name = config.get("reconstruct.engine")
    if name not in ENGINES:
        raise OptionsError("engine", f"got {name!r}; expected one of {', '.join(ENGINES)}")
    cls = ENGINES[name].options
    known = {f.name for f in dataclasses.fields(cls)}
    for key in base:
        if isinstance(key, str) and key in known:
            continue
        users = [e for e, x in ENGINES.items() if key in {f.name for f in dataclasses.fields(x.options)}]
        if users:
            raise OptionsError(str(key), f"got {base[key]!r}, but engine {name!r} does not use it (only "
                               f"{' and '.join(repr(u) for u in users)}); drop it or choose engine={users[0]!r}")
        raise unknown_option(key, known)
    base["engine"] = name
    return cls(**base)
