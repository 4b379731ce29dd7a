"""A run's live state on the scheduler's ``/daskptycho`` dashboard page.

The run tells the scheduler-side store (:mod:`daskptycho.dashboard`) that it starts, cuts a
small phase image out of the tiles' cores now and then (tiny tasks on the tiles' workers)
and sends each iteration's cost and image; tile progress the page reads from the tasks
themselves.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings

from .. import config, dashboard


class LiveView:
    """The live page of one run.

    Parameters
    ----------
    drv : :class:`~daskptycho.engines.driver.Driver`
        Submits the preview tasks and fetches them (a lost worker becomes
        :class:`~daskptycho.errors.WorkerLost`, as for any pinned result).

    Attributes
    ----------
    page : str or None
        The page's address once :meth:`begin` found one (None without a dashboard or with
        ``daskptycho.dashboard.live`` off).
    """

    def __init__(self, drv):
        self.drv = drv
        self.page = None
        self._state = None  # engine, iterations and when the last image was cut; None: no live page
        self._held = []  # iterations' messages not yet sent (see publish)

    def begin(self, engine, iterations, tiles=(1, 1), rounds=1):
        """Tell the scheduler's live state a run starts.

        Parameters
        ----------
        engine : str
        iterations : int
        tiles : (rows, cols), the tile (or part) grid whose progress the page draws
        rounds : int, pass rounds per iteration (``update`` tasks per tile per iteration)

        Returns
        -------
        str or None: the page's address (also :attr:`page`, and logged at INFO on the
        ``daskptycho`` logger).
        """
        client = self.drv.client
        self.page = self._state = None
        self._held = []
        if not config.get("dashboard.live", True):
            return None
        try:
            served = client.run_on_scheduler(dashboard.begin_run, engine=engine, iterations=int(iterations),
                                             tiles=[int(tiles[0]), int(tiles[1])], rounds=int(rounds))
        except Exception as e:  # a scheduler that cannot import daskptycho: run on, without the page
            warnings.warn(f"daskptycho: no live dashboard state on this scheduler ({type(e).__name__}: {e})", RuntimeWarning,
                          stacklevel=2)
            return None
        self._state = {"engine": engine, "iterations": int(iterations), "preview_at": None}
        try:
            link = client.dashboard_link
        except Exception:  # a scheduler without an HTTP dashboard
            link = None
        self.page = link.rsplit("/", 1)[0] + dashboard.ROUTE if served and link else None
        if self.page:
            logging.getLogger("daskptycho").info("live reconstruction page: %s", self.page)
        return self.page

    def due(self, it):
        """Would :meth:`preview` cut an image for iteration ``it`` now? (A live page, and
        at most one image per ``preview_every_s``; the first and the last iteration always
        get theirs: a few tasks per tile and a fetch through this process.)"""
        live = self._state
        if not live:
            return False
        last = it + 1 >= live["iterations"]
        return last or live["preview_at"] is None or time.monotonic() - live["preview_at"] >= dashboard.preview_every_s()

    def preview(self, it, states, placement, regions=None, origins=None, modes=None, pinned=True):
        """Submit the tiny tasks that cut a downsampled phase image of the current
        object out of each tile's core (never the whole tile moves).

        Parameters
        ----------
        it : int, the iteration
        states : dict ``{tile: future}``: object (S, h, w), or a dict with ``"object"``; or
            ``{tile: (future, name)}``: the state under ``name`` in a stage's result
        placement : dict ``{tile: address}``, the run's units and workers: the tasks are
            pinned there (with ``pinned``) and their fetch watches those workers
        regions : dict ``{tile: (slice y, slice x)}``: each tile's core inside its state
            (with ``origins``); None: ``states`` holds one whole object
        origins : dict ``{tile: (y0, x0)}``: the core's first pixel in the whole object
        modes : slice, optional: the entries of the first axis to draw (dm: ``slice(0, 1)``,
            the dominant object mode); default: every slice, phases summed
        pinned : bool
            Run each task on its tile's worker (False: ``states`` live anywhere).

        The image's longest side is ``daskptycho.dashboard.preview_px`` (256) pixels. An
        image is cut at most once every ``daskptycho.dashboard.preview_every_s`` seconds
        (and always for the run's first and last iteration); the cost goes out every iteration.

        Returns
        -------
        dict: what :meth:`publish` takes as ``image`` (``None`` without a live page, or
        when this iteration gets no image).
        """
        live = self._state
        if not self.due(it):
            return None
        live["preview_at"] = time.monotonic()
        size = dashboard.preview_px()
        if regions is None:
            stride = full = None
            regions = {k: (modes, slice(None), slice(None)) if modes else (slice(None), slice(None)) for k in states}
            origins = {k: (0, 0) for k in states}
        else:
            full = (max(origins[k][0] + r[0].stop - r[0].start for k, r in regions.items()),
                    max(origins[k][1] + r[1].stop - r[1].start for k, r in regions.items()))
            stride = max(1, -(-max(full) // size))
        futs = {}
        client = self.drv.client
        for k, st in states.items():
            pin = dict(workers=[placement[k]], allow_other_workers=False) if pinned else {}
            st, name = st if isinstance(st, tuple) else (st, None)
            with self.drv.span("update"):
                futs[k] = client.submit(dashboard.phase_preview, st, regions[k], origins[k], stride, size, name,
                                        key=("preview", it, *k, uuid.uuid4().hex[:8]), pure=False, **pin)
        return {"futures": futs, "stride": stride, "shape": full, "placement": dict(placement)}

    def futures(self, image):
        """The preview tasks of ``image`` (from :meth:`preview`), to wait for with the costs."""
        return list(image["futures"].values()) if image else []

    def publish(self, it, cost, image=None, tiles_done=False):
        """One iteration's live state for the scheduler: iteration, cost and the small
        phase image from :meth:`preview` (fetched here: a few KiB per tile).

        The message is held until :meth:`flush`, which the run calls before it waits for
        its next results: the iterations whose costs arrive together (a peer block's) then
        reach the scheduler as one call, not one round trip each while the workers fill
        every core (on this 2-core machine a call took about 0.5 ms of the client
        process's CPU, which hosts an embedded cluster's scheduler, and the event-log entry
        sent from the client another 0.3 ms).

        Per-tile progress needs no message where the tiles have tasks of their own: the
        scheduler-side state watches their progress tasks finish
        (:attr:`daskptycho.keys.Kind.progress`). ``tiles_done``: every tile finished
        iteration ``it`` when its cost came (peer stages, whose tiles have no tasks).
        """
        live = self._state
        if not live:
            return
        msg = {"engine": live["engine"], "iteration": int(it), "cost": float(cost), "tiles_done": bool(tiles_done)}
        if image is not None:
            keys = list(image["futures"])
            pieces = dict(zip(keys, self.drv.results([image["futures"][k] for k in keys], image["placement"])))
            msg.update(dashboard.stitch_preview(pieces, image["stride"], image["shape"]))
        self._held.append(msg)

    def flush(self):
        """Send the held messages (:meth:`publish`) to the scheduler in one call, in order
        (:func:`~daskptycho.dashboard.receive`, which also puts their figures in the
        scheduler's event log, the /events page: ``Client.log_event`` would be one more
        round trip per iteration)."""
        if not self._held:
            return
        msgs, self._held = self._held, []
        self.drv.client.run_on_scheduler(dashboard.receive, msgs=msgs)
