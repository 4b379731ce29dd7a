"""Engine ``dm``: the multi-mode difference map with positions split over workers."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from ..backend import to_host
from ..errors import OptionsError
from ..io.checkpoint import read_array, write_array
from ..schedule.dm import dm_iteration, home
from ..tasks import dm as dt
from .options import Choice, EngineOptions, Number, modes, option
from .problem import Problem, prepare
from .run import PinnedRun, RunOutput, Step, resume_meta


@dataclass(kw_only=True)
class DMOptions(EngineOptions):
    """Options of engine ``dm`` (the multi-mode difference map, 2-D).

    Attributes
    ----------
    probe_modes : int, "auto" or None
        "auto" grows the modes until the weakest carries under 1% of the power.
    beta : float
        The relaxation of the view update, 0 < beta <= 1 (default 0.8): eq. 3's
        parameter (the paper uses 0.8), and RAAR's.
    view_update : {"raar", "dm"}
        How the views are updated (config ``daskptycho.reconstruct.view_update``, default
        "raar"): "raar", relaxed averaged alternating reflections (Luke 2005: eq. 3
        plus a pull of the views towards ``P O`` by ``1 - beta``,
        :func:`~daskptycho.physics.dm.raar_update_views`), which does not drift on
        noisy data; "dm", the paper's eq. 3, whose error against the truth rises again
        after about 40 iterations on noisy fly scans (``docs/difference-map.md``).
    object_modes : int
    partitions : int or None
        Parts of the scan (default: one per worker, at most one per position).
    partition : {"blocks", "index"}
        Spatially contiguous blocks, or the paper's even split of the acquisition order.
    regularization : float
        The floor added to the denominators of the object and probe updates (eqs. 5
        and 6), as a fraction of each denominator's peak (default 1e-3; the other
        engines' ``regularization`` is a preconditioner floor of another scale, and
        ``dm`` does not take their default).
    """

    ENGINE = "dm"
    engine: str = "dm"
    probe_modes: int | str | None = option(lambda n, v: v if v == "auto" else modes(n, v), None)
    beta: float = option(Number(False, 0, closed=False), 0.8)
    view_update: str = option(Choice(("raar", "dm")), config_key="view_update")
    object_modes: int = option(Number(True, 1), 1)
    partitions: int | None = option(Number(True, 1, none=True), None)
    partition: str = option(Choice(("blocks", "index")), "blocks")
    regularization: float = option(Number(False, 0), 1e-3)

    def check(self):
        super().check()
        if not self.beta <= 1:
            raise OptionsError("beta", f"got {self.beta!r}; expected 0 < beta <= 1 (the paper uses 0.8)")
        if self.slices != 1:
            raise OptionsError("slices", "the difference map is a 2-D method: use slices=1 (engine='gd' or engine='ml' for multislice)")
        if self.object_amplitude_max not in ("auto", None):
            raise OptionsError("object_amplitude_max", "the difference map's object update does not clip amplitudes: leave it 'auto' "
                               "(engine='ml' or 'gd' clip them)")
        if (self.checkpoint_every or self.resume) and self.probe_modes == "auto":
            raise OptionsError("probe_modes", "'auto' runs several reconstructions and cannot be checkpointed; give the number of modes")


def partition_positions(problem: Problem, k, how="blocks"):
    """Split the scan into ``k`` parts.

    ``blocks`` (default): spatially contiguous blocks, a near-square grid of parts
    over the positions sorted by y then x (so each part's object crop is small);
    ``index``: the paper's even split of the acquisition order.

    Returns a list of int arrays (scan indices), none empty.
    """
    j = problem.n_positions
    if not 1 <= k <= j:
        raise OptionsError("partitions", f"got {k}; expected between 1 and the number of positions ({j})")
    if how == "index":
        return [p for p in np.array_split(np.arange(j), k)]
    if how != "blocks":
        raise OptionsError("partition", f"got {how!r}; expected 'blocks' or 'index'")
    rows = max(1, int(np.floor(np.sqrt(k))))
    while k % rows:
        rows -= 1
    cols = k // rows
    pos = problem.positions_m
    order = np.lexsort((pos[:, 1], pos[:, 0]))
    parts = []
    for band in np.array_split(order, rows):
        band = band[np.argsort(pos[band, 1], kind="stable")]
        parts += [np.sort(p) for p in np.array_split(band, cols)]
    return parts


def check_resume_view_update(meta, view_update):
    """Refuse to resume with another view update than the checkpoint's.

    A checkpoint records its options; one made before ``view_update`` existed was made
    by eq. 3 (``"dm"``), though the default is now ``"raar"``, so it resumes only with
    ``view_update="dm"``.

    Parameters
    ----------
    meta : dict or None
        The checkpoint's attributes (:func:`~daskptycho.engines.run.resume_meta`); None: not resuming.
    view_update : str
        The resuming run's.
    """
    if meta is None:
        return
    stored = meta.get("options") or {}
    if isinstance(stored, str):
        stored = json.loads(stored)
    made_with = stored.get("view_update", "dm")
    if made_with != view_update:
        raise OptionsError("view_update", f"is {view_update!r} but the checkpoint was made with {made_with!r}"
                           f"{' (the paper eq. 3: it predates the option)' if 'view_update' not in stored else ''}; "
                           f"resume with view_update={made_with!r}")


def part_region(corners, window):
    """The object region ``(y0, y1, x0, x1)`` a part's windows (top-left ``corners``, (J, 2),
    of shape ``window``) touch: its crop of the object."""
    return (int(corners[:, 0].min()), int(corners[:, 0].max()) + window[0],
            int(corners[:, 1].min()), int(corners[:, 1].max()) + window[1])


class DMRun(PinnedRun):
    """Engine ``dm``: views for every position and (probe mode, object mode) pair, held by
    parts of the scan pinned to workers; the object, probe and mode mixing are small
    futures formed each iteration by tree reductions of the parts' partial sums; each
    part gets back only its crop of the object. The object, the probe and the global
    updates live on the worker of the first part (:func:`~daskptycho.schedule.dm.home`).

    Iteration ``it + 1`` is submitted before the cost of ``it`` is awaited (the graph
    orders every reader of a part's views before the next view update, which works in
    place); a checkpoint's writes of the views finish before the next iteration is
    submitted.
    """

    unit_label = "dm parts"
    lookahead = 1
    writes_before_next = True

    def __init__(self, drv, problem, source, progress=None):
        o = problem.options
        meta = resume_meta(problem)
        check_resume_view_update(meta, o.view_update)
        # a resumed run keeps the checkpoint's partitions (its views are per part)
        k = o.partitions or (int(meta["partitions"]) if meta else min(len(drv.worker_addresses), problem.n_positions))
        self.parts_idx = partition_positions(problem, k, o.partition)
        self.parts = [(0, p) for p in range(len(self.parts_idx))]
        self.units = dict(zip(self.parts, self.parts_idx))
        self.live_grid = (1, len(self.parts))
        self.regions = {p: part_region(problem.corners[idx], problem.window) for p, idx in self.units.items()}
        corners = {p: problem.corners[idx] - np.array([self.regions[p][0], self.regions[p][2]]) for p, idx in self.units.items()}
        self.context = dt.DMContext(mask=problem.mask, window=problem.window, corners=corners, regions=self.regions,
                                    grid_shape=problem.grid.shape, beta=o.beta, view_update=o.view_update, regularization=o.regularization, device=o.device,
                                    working_set=(o.working_set_mib, o.working_set_fraction))
        self.views, self.crops, self.updates = {}, {}, []
        self.probe = self.obj = self.mixing = self.ctx = None
        super().__init__(drv, problem, source, progress)

    def unit_name(self, unit):
        return str(unit[1])

    def begin(self, meta):
        o, c, ck = self.problem.options, self.drv.client, self.ck
        self.ctx = c.scatter(self.context, hash=False)  # not broadcast: see TiledRun.begin
        shape = (o.object_modes,) + tuple(self.problem.grid.shape)
        if meta is None:
            self.updates = []
            self.probe = c.scatter(self.problem.probe, hash=False)
            self.mixing = None
            self.obj = self.drv.submit_pinned(dt.initial_object, shape, self.problem.start_object, worker=self.home_worker,
                                              key=self.key("dm-object-init"))
        else:
            pc, oc, fr = ck.read(meta, "probe_change"), ck.read(meta, "object_change"), ck.read(meta, "fractions")
            self.updates = [{"probe_change": pc[i], "object_change": float(oc[i]), "fractions": fr[i]} for i in range(self.first)]
            self.probe = c.scatter(ck.read(meta, "probe"), hash=False)  # K x N x N: small
            self.mixing = c.scatter(ck.read(meta, "mixing"), hash=False) if meta.get("mixing") else None
            self.obj = self.drv.submit_pinned(read_array, meta["group"], "object", worker=self.home_worker,
                                              key=self.key("dm-object-restore"))
        with self.drv.span("load"):
            for p in self.parts:
                w = self.workers[p]
                if meta is None:  # each part makes its crop and views itself: the object is not sent around
                    self.crops[p] = self.drv.submit_pinned(dt.initial_crop, shape, self.regions[p], o.device,
                                                           self.problem.start_patch(self.regions[p]), worker=w,
                                                           key=self.key("crop-init", *p))
                    self.views[p] = self.drv.submit_pinned(dt.init_views, self.probe, self.crops[p], self.ctx, p, worker=w,
                                                           key=self.key("views-init", *p))
                else:  # each part reads its views and its crop of the object from the store
                    self.crops[p] = self.drv.submit_pinned(read_array, meta["group"], "object", self.regions[p], o.device, worker=w,
                                                           key=self.key("crop-restore", *p))
                    self.views[p] = self.drv.submit_pinned(read_array, meta["group"], _views_name(p), None, o.device, worker=w,
                                                           key=self.key("views-restore", *p))

    def step(self, it):
        o = self.problem.options
        g = dm_iteration(self.parts, it, self.views, self.data, self.probe, self.crops, self.mixing, self.obj, self.ctx,
                         self.regions, o.device, update_probe=it >= o.probe_refine_start, tag=self.tag)
        out = g.outputs
        wanted = [*out["states"].values(), *out["crops"].values(), out["probe"], out["mixing"], out["object"],
                  out["summary"], *out["costs"]]
        fut = self.drv.submit_graph(g, self.workers, wanted)
        self.views = {p: fut[k] for p, k in out["states"].items()}
        self.crops = {p: fut[k] for p, k in out["crops"].items()}
        self.probe, self.mixing, self.obj = fut[out["probe"]], fut[out["mixing"]], fut[out["object"]]
        return Step(it, [fut[out["costs"][0]]], {"summary": fut[out["summary"]]})

    def record(self, it, extras):
        self.updates.append(extras["summary"])

    def preview(self, it):
        return self.live.preview(it, {home(self.parts): self.obj}, self.workers, modes=slice(0, 1))

    def checkpoint_arrays(self):
        o = self.problem.options
        n, w = self.problem.window
        k = self.problem.probe.shape[0]
        arrays = {_views_name(p): ((len(idx), k, o.object_modes, n, w), np.complex64) for p, idx in self.units.items()}
        arrays["object"] = ((o.object_modes,) + tuple(self.problem.grid.shape), np.complex64)
        return arrays

    def checkpoint_writes(self, path, it):
        writes = [self.drv.submit_pinned(write_array, path, _views_name(p), self.views[p], worker=self.workers[p],
                                         key=self.key("checkpoint", it, *p)) for p in self.parts]
        writes.append(self.drv.submit_pinned(write_array, path, "object", self.obj, worker=self.home_worker,
                                             key=self.key("checkpoint-object", it)))
        small = {"probe": self._host(self.probe, "probe", it)}
        if self.mixing is not None:
            small["mixing"] = self._host(self.mixing, "mixing", it)  # its value is None until the probe is refined
        return writes, small

    def checkpoint_small(self):
        u = self.updates
        return {"probe_change": np.array([x["probe_change"] for x in u]), "object_change": np.array([x["object_change"] for x in u]),
                "fractions": np.array([x["fractions"] for x in u])}

    def checkpoint_attrs(self, small):
        return {"partitions": len(self.parts), "mixing": "mixing" in small}

    @property
    def home_worker(self):
        """The worker holding the object, the probe and the global updates (the first part's)."""
        return self.workers[home(self.parts)]

    def _host(self, fut, name, *parts):
        """``fut``'s value (the object, the probe or the mixing: they live on the home
        worker) copied to host memory there (device arrays never reach the client)."""
        return self.drv.submit_pinned(to_host, fut, worker=self.home_worker, key=self.key("host", name, *parts))

    def finish(self):
        final_obj, final_probe = self.drv.results([self._host(self.obj, "object"), self._host(self.probe, "probe")], self.workers)
        u = self.updates
        info = {
            "probe_change": np.array([x["probe_change"] for x in u]),
            "object_change": np.array([x["object_change"] for x in u]),
            "fractions": u[-1]["fractions"] if u else np.ones(1),
            "memory": self.memory(self.views, self.crops),
            "partitions": [idx.tolist() for idx in self.parts_idx],
            "recoveries": self.recoveries,
            "resumed_from": self.resumed_from,
        }
        return RunOutput(final_obj, final_probe, self.costs, attrs=info)

    def drop(self):
        self.views, self.crops = {}, {}
        self.probe = self.obj = self.mixing = self.ctx = None


def _views_name(part):
    return f"views-{part[1]}"


def run(drv, ds, problem, source, progress=None):
    """Run engine ``dm`` on the driver's cluster (the registry's signature).

    With ``probe_modes="auto"`` the modes grow from 1 until the weakest carries under 1%
    of the power (the paper's recipe); the last run whose modes all carry at least 1% is kept.
    """
    opts = problem.options
    auto = opts.probe_modes == "auto"
    tried, best = [], None
    for m in range(1, 9) if auto else [None]:
        p = prepare(ds, dataclasses.replace(opts, probe_modes=m)) if auto else problem
        out = DMRun(drv, p, source, progress).run()
        weakest = float(np.min(out.attrs["fractions"]))
        tried.append({"modes": int(p.probe.shape[0]), "weakest_fraction": weakest, "final_cost": out.costs[-1]})
        if auto and m > 1 and weakest < 0.01:
            break
        best = (p, out)
    problem, out = best
    info, obj, costs = out.attrs, out.object, out.costs
    n_it = len(costs)
    variables = {
        "probe_change": (("iteration", "mode"), info["probe_change"].reshape(n_it, -1), {"units": "1", "long_name": "relative change of each probe mode (eq. 7)"}),
        "object_change": (("iteration",), info["object_change"], {"units": "1", "long_name": "relative change of the object (eq. 7)"}),
    }
    if obj.shape[0] > 1:
        variables["object_modes"] = (("omode", "y", "x"), obj, {"units": "1", "long_name": "object modes"})
    attrs = {
        "memory": json.dumps(info["memory"]),
        "partitions": len(info["partitions"]),
        "fourier_error_relative_final": float(costs[-1] / max(problem.mean_counts * problem.n_positions, 1e-30)),
        "probe_modes_tried": json.dumps(tried),
        "recoveries": json.dumps(info["recoveries"]),
    }
    return problem, RunOutput(obj[:1], out.probe, costs, attrs, variables,
                              cost_name="Fourier error sum (sqrt(I_model) - sqrt(I))^2 of the model entering each iteration")
