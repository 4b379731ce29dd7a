"""Engine ``dm``: the multi-mode difference map with positions split over workers."""

from __future__ import annotations

import uuid

import numpy as np

from ..errors import OptionsError
from ..io.checkpoint import Checkpoint, read_array, write_array
from ..schedule.dm import dm_iteration
from . import dmtasks as dt
from . import tiletasks as tt
from .driver import WorkerLost
from .gd import _checkpoint_attrs, retag
from .problem import Problem


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


def _region(corners, window):
    return (int(corners[:, 0].min()), int(corners[:, 0].max()) + window[0],
            int(corners[:, 1].min()), int(corners[:, 1].max()) + window[1])


def run_dm(drv, problem: Problem, source, progress=None):
    """Run the DM engine on the driver's cluster.

    With ``checkpoint_every`` the views (by each part's worker), the object, probe,
    mixing and the per-iteration figures go into the result store every K
    iterations; ``resume`` continues from there. A lost worker is noticed while
    waiting: its parts move to live workers and every part rolls back to the last
    checkpoint (or the start), so the result is the undisturbed one.

    Returns object (L, H, W), probe (K, N, N), costs, and info (changes, fractions, memory, recoveries).
    """
    run = _DMRun(drv, problem, source, progress)
    while True:
        try:
            run.start()
            run.iterate()
            return run.finish()
        except WorkerLost as e:
            run.recover(e)


class _DMRun:
    """The state of a DM run on the client (futures of each part's views, patterns
    and crop; the object, probe and mixing; the figures so far)."""

    def __init__(self, drv, problem, source, progress):
        from .. import config

        o = problem.options
        self.drv, self.problem, self.source, self.progress = drv, problem, source, progress
        self.ck = Checkpoint(o.checkpoint) if o.checkpoint else None
        self.meta = self.ck.latest() if (self.ck is not None and o.resume) else None
        self.resumed_from = int(self.meta["completed"]) if self.meta else None
        # a resumed run keeps the checkpoint's partitions (its views are per part)
        k = o.partitions or (int(self.meta["partitions"]) if self.meta else min(len(drv.worker_addresses), problem.n_positions))
        self.parts_idx = partition_positions(problem, k, o.partition)
        self.parts = [(0, p) for p in range(len(self.parts_idx))]
        self.workers = drv.place_tiles(self.parts)
        self.n_workers = len(drv.worker_addresses)
        self.max_recoveries = int(config.get("recovery.max_recoveries", 3))
        self.regions = {p: _region(problem.corners[idx], problem.window) for p, idx in zip(self.parts, self.parts_idx)}
        corners = {p: problem.corners[idx] - np.array([self.regions[p][0], self.regions[p][2]]) for p, idx in zip(self.parts, self.parts_idx)}
        self.context = dt.DMContext(mask=problem.mask, window=problem.window, corners=corners, regions=self.regions,
                                    grid_shape=problem.grid.shape, beta=o.beta, device=o.device,
                                    working_set=(o.working_set_mib, o.working_set_fraction))
        self.data, self.views, self.crops, self.recoveries = {}, {}, {}, []
        self.probe = self.obj = self.mixing = self.ctx = None
        self.run_id = uuid.uuid4().hex[:8]
        drv.live_begin("dm", o.iterations, (1, len(self.parts)))

    def _key(self, name, *parts):
        return (name, *parts, self.tag)  # unique to this run and attempt (see gd.retag)

    def start(self):
        drv, o, c = self.drv, self.problem.options, self.drv.client
        self.tag = f"{self.run_id}.{len(self.recoveries)}"
        self.ctx = c.scatter(self.context, hash=False)  # not broadcast: see gd's start
        meta, ck = self.meta, self.ck
        shape = (o.object_modes,) + tuple(self.problem.grid.shape)
        if meta is None:
            self.first, self.costs, self.updates = 0, [], []
            self.probe = c.scatter(self.problem.probe, hash=False)
            self.mixing = None
            self.obj = c.submit(dt.initial_object, shape, key=self._key("dm-object-init"), pure=False)
        else:
            self.first = int(meta["completed"])
            self.costs = [float(v) for v in ck.read(meta, "cost")]
            pc, oc, fr = ck.read(meta, "probe_change"), ck.read(meta, "object_change"), ck.read(meta, "fractions")
            self.updates = [{"probe_change": pc[i], "object_change": float(oc[i]), "fractions": fr[i]} for i in range(self.first)]
            self.probe = c.scatter(ck.read(meta, "probe"), hash=False)  # K x N x N: small
            self.mixing = c.scatter(ck.read(meta, "mixing"), hash=False) if meta.get("mixing") else None
            self.obj = c.submit(read_array, meta["group"], "object", key=self._key("dm-object-restore"), pure=False)
        with drv.span("load"):
            for p, idx in zip(self.parts, self.parts_idx):
                w = self.workers[p]
                if p not in self.data:
                    self.data[p] = drv.submit_pinned(tt.load_tile_patterns, self.source, idx, o.device, worker=w, key=self._key("load", *p))
                if meta is None:  # each part makes its crop and views itself: the object is not sent around
                    self.crops[p] = drv.submit_pinned(dt.initial_crop, shape, self.regions[p], o.device, worker=w, key=self._key("crop-init", *p))
                    self.views[p] = drv.submit_pinned(dt.init_views, self.probe, self.crops[p], self.ctx, p, worker=w,
                                                      key=self._key("views-init", *p))
                else:  # each part reads its views and its crop of the object from the store
                    self.crops[p] = drv.submit_pinned(read_array, meta["group"], "object", self.regions[p], o.device, worker=w,
                                                      key=self._key("crop-restore", *p))
                    self.views[p] = drv.submit_pinned(read_array, meta["group"], _views_name(p), None, o.device, worker=w,
                                                      key=self._key("views-restore", *p))

    def iterate(self):
        drv, o, c = self.drv, self.problem.options, self.drv.client
        for it in range(self.first, o.iterations):
            with drv.span("iteration"):
                g = retag(dm_iteration(self.parts, it, self.views, self.data, self.probe, self.crops, self.mixing, self.obj, self.ctx,
                                       self.problem.grid.shape, self.regions, o.device, update_probe=it >= o.probe_refine_start), self.tag)
                out = g.outputs
                wanted = [*out["states"].values(), *out["crops"].values(), out["probe"], out["mixing"], out["object"],
                          out["object_update"], out["probe_update"], *out["costs"]]
                fut = drv.submit_graph(g, self.workers, wanted)
            self.views = {p: fut[kk] for p, kk in out["states"].items()}
            self.crops = {p: fut[kk] for p, kk in out["crops"].items()}
            self.probe, self.mixing, self.obj = fut[out["probe"]], fut[out["mixing"]], fut[out["object"]]
            with drv.span("update"):
                summary = c.submit(_summary, fut[out["object_update"]], fut[out["probe_update"]], pure=False)
            cost, upd = drv.results([fut[out["costs"][0]], summary], self.workers)
            cost = float(cost)
            self.costs.append(cost)
            self.updates.append(upd)
            drv.publish(it, cost, drv.preview(it, {(0, 0): self.obj}, modes=slice(0, 1)))
            if self.progress is not None:
                self.progress(it, cost)
            del fut, g
            if o.checkpoint_every and ((it + 1) % o.checkpoint_every == 0 or it + 1 == o.iterations):
                # before the next iteration: its view update works in place on these views
                self._save(it)

    def _save(self, it):
        o, drv, c = self.problem.options, self.drv, self.drv.client
        n, w = self.problem.window
        k = self.problem.probe.shape[0]
        arrays = {_views_name(p): ((len(idx), k, o.object_modes, n, w), np.complex64) for p, idx in zip(self.parts, self.parts_idx)}
        arrays["object"] = ((o.object_modes,) + tuple(self.problem.grid.shape), np.complex64)
        path = self.ck.begin(it + 1, arrays)
        futs = [drv.submit_pinned(write_array, path, _views_name(p), self.views[p], worker=self.workers[p],
                                  key=self._key("checkpoint", it, *p)) for p in self.parts]
        futs.append(c.submit(write_array, path, "object", self.obj, key=self._key("checkpoint-object", it), pure=False))
        *_, probe, mixing = drv.results(futs + [self.probe, self.mixing], self.workers)
        small = {"cost": np.asarray(self.costs, dtype=np.float64), "probe": np.asarray(probe),
                 "probe_change": np.array([u["probe_change"] for u in self.updates]),
                 "object_change": np.array([u["object_change"] for u in self.updates]),
                 "fractions": np.array([u["fractions"] for u in self.updates])}
        if mixing is not None:
            small["mixing"] = np.asarray(mixing)
        self.ck.commit(path, _checkpoint_attrs(self.problem, it + 1, partitions=len(self.parts), mixing=mixing is not None), small=small)

    def finish(self):
        drv = self.drv
        nb = [drv.submit_pinned(_part_bytes, self.views[p], self.data[p], self.crops[p], worker=self.workers[p],
                                key=self._key("nbytes", *p)) for p in self.parts]
        final_obj, final_probe, *nbytes = drv.results([self.obj, self.probe, *nb], self.workers)
        final_obj, final_probe = np.asarray(final_obj), np.asarray(final_probe)
        memory = drv.memory_report(dict(zip(self.parts, nbytes)), self.workers)
        u = self.updates
        info = {
            "probe_change": np.array([x["probe_change"] for x in u]),
            "object_change": np.array([x["object_change"] for x in u]),
            "fractions": u[-1]["fractions"] if u else np.ones(1),
            "memory": memory,
            "partitions": [idx.tolist() for idx in self.parts_idx],
            "recoveries": self.recoveries,
            "resumed_from": self.resumed_from,
        }
        return final_obj, final_probe, self.costs, info

    def recover(self, err):
        """After a lost worker: drop the futures, move the lost parts, roll every
        part back to the last checkpoint (or the start) and log it."""
        from .recovery import roll_back

        self.views, self.crops = {}, {}  # released, not cancelled: see roll_back
        self.probe = self.obj = self.mixing = self.ctx = None
        roll_back(self, err, units="dm parts", label=lambda p: str(p[1]))


def _views_name(part):
    return f"views-{part[1]}"


def _summary(oupd, pupd):
    """The small per-iteration figures of the global updates (not the arrays)."""
    return {"probe_change": np.asarray(pupd["probe_change"]), "object_change": oupd["object_change"],
            "fractions": np.asarray(pupd["fractions"])}


def _part_bytes(views, data, crop):
    """Bytes a part holds: its views, patterns and object crop."""
    return {"views": int(views.nbytes), "patterns": int(data.nbytes), "object": int(crop.nbytes)}
