"""Reconstruct while the scan is measured: rounds over a growing store.

:func:`follow` reads a dataset store that a writer (:func:`daskptycho.open_writer`,
``daskptycho simulate --stream``) is still filling, and reconstructs in *rounds*: each
round is a run of the engine over every frame committed when it starts, started from the
previous round's object and probe (:func:`daskptycho.reconstruct`'s ``start``) on one
cluster that stays up, and lasts ``round_iterations`` iterations, so frames committed
during a round are used from the next one. Each round's workers read their own frames
from the store (a tile's worker its tile's, a part's its part's). The object grid is
made afresh each round from the positions present: a frame that lands outside the grid
of the running round grows the next round's grid, and the image so far is placed on it
by its coordinates. When the writer marks the scan finished, a last round of
``iterations_after`` iterations over every frame gives the result. A writer that stops
without finishing (no commit and no heartbeat for ``timeout_s``) ends the run with the
result so far, marked unfinished.

What it costs: a round starts a new run, so the workers read all their frames again and
the engine builds its graphs again (a second or so at the demo sizes); memory per worker
is still bounded by the unit it holds.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time

import numpy as np
import xarray as xr

from . import config, dashboard
from .cluster import connect
from .engines import engine_options, reconstruct
from .errors import OptionsError, StreamStalledError
from .io.stream import open_frames, stream_state, wait_for_frames

__all__ = ["follow"]

log = logging.getLogger("daskptycho")


def _setting(name, value, default, minimum, integer):
    v = config.get(f"follow.{name}", default) if value is None else value
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= minimum
    if not ok or (integer and int(v) != v):
        kind = "an integer" if integer else "a number"
        raise OptionsError(name, f"got {v!r}; expected {kind} >= {minimum} (argument, or daskptycho.follow.{name})")
    return int(v) if integer else float(v)


def follow(path, engine=None, *, iterations_after=None, round_iterations=None, start_frames=None, timeout_s=None,
           poll_s=None, client=None, cluster=None, cluster_options=None, progress=None, on_round=None, **kwargs):
    """Reconstruct a dataset store while its frames are being written (module docstring).

    Parameters
    ----------
    path : str or path-like
        The dataset store a writer fills (it may not exist yet); an ordinary, finished
        store is reconstructed at once, in one round.
    engine : str, optional
        As :func:`daskptycho.reconstruct`.
    iterations_after : int, optional
        Iterations of the last round, over every frame, once the scan is finished
        (default: the ``iterations`` option).
    round_iterations : int, optional
        Iterations of each round while frames still arrive (default config
        ``daskptycho.follow.round_iterations``).
    start_frames : int, optional
        Committed frames before the first round (default: the store's first chunk). A
        tiled engine whose tiles the first frames cannot fill waits for more.
    timeout_s : float, optional
        Seconds without a commit or heartbeat (by this process's clock) after which the
        writer counts as stopped (default config ``daskptycho.follow.timeout_s``).
    poll_s : float, optional
        Seconds between reads of the store's state while waiting.
    client, cluster, cluster_options :
        As :func:`daskptycho.reconstruct`; one cluster serves every round.
    progress : callable(iteration, cost), optional
        Called after every iteration, numbered over the whole run.
    on_round : callable(dict), optional
        Called after every round with its record (see ``follow_rounds`` below) and
        ``result``, the round's result.
    **kwargs
        The engine's options (as :func:`daskptycho.reconstruct`); ``iterations`` is the
        default of ``iterations_after``.

    Returns
    -------
    xarray.Dataset
        The last round's result, with ``cost`` over every iteration of the run,
        ``frames_used`` (iteration) and the attributes ``follow_rounds`` (JSON: per
        round its first iteration, iterations, frames used, the store's committed
        frames, seconds since the start, and the age of its newest frame's commit when
        the round started), ``scan_finished`` and ``writer_stopped``.

    Raises
    ------
    StreamStalledError
        The writer stopped before the first round could start.
    """
    path = os.fspath(path)
    if engine is not None:
        kwargs["engine"] = engine
    for bad in ("start", "resume", "checkpoint"):
        if kwargs.get(bad):
            raise OptionsError(bad, "is not available while following a scan: each round starts from the previous one")
    opts = engine_options(None, **kwargs)  # bad options fail before anything waits
    after = _setting("iterations_after", iterations_after, opts.iterations, 1, True)
    per_round = _setting("round_iterations", round_iterations, 5, 1, True)
    timeout = _setting("timeout_s", timeout_s, 60.0, 0.01, False)
    poll = _setting("poll_s", poll_s, 0.5, 0.001, False)
    if start_frames is not None:
        start_frames = _setting("start_frames", start_frames, 1, 1, True)
    t0 = time.monotonic()
    if client is not None:
        return _rounds(path, client, kwargs, after, per_round, start_frames, timeout, poll, progress, on_round, t0)
    known = ("jobs", "scheduler_file", "tls", "memory_limit")
    with connect(cluster or config.get("cluster.spec"), workers=opts.workers, device=opts.device,
                 **{k: v for k, v in (cluster_options or {}).items() if k in known}) as conn:
        return _rounds(path, conn.client, kwargs, after, per_round, start_frames, timeout, poll, progress, on_round, t0)


def _rounds(path, client, kwargs, after, per_round, start_frames, timeout, poll, progress, on_round, t0):
    st = wait_for_frames(path, 1, timeout_s=timeout, poll_s=poll)
    want = start_frames or max(st.chunk_frames or 1, 1)
    st = wait_for_frames(path, want, timeout_s=timeout, poll_s=poll)
    result, rounds, costs, used = None, [], [], []
    changed_at, last_seen, stopped = time.monotonic(), None, False
    while True:
        st = stream_state(path)
        seen = (st.frames_complete, st.scan_finished, st.heartbeat_utc)
        if seen != last_seen:
            changed_at, last_seen = time.monotonic(), seen
        frames = st.frames_complete
        last = st.scan_finished
        if not last and result is not None and time.monotonic() - changed_at > timeout:
            stopped = True
            log.warning("the writer of %s committed nothing for %.0f s (%d frames, scan not finished): keeping the "
                        "result so far", path, timeout, frames)
            break
        ds = open_frames(path, 0, frames, check_values=False)
        first = len(costs)
        n_it = after if last else per_round
        age = None
        if st.last_commit_utc is not None:
            age = (datetime.datetime.now(datetime.UTC) - st.last_commit_utc).total_seconds()
        started = time.monotonic() - t0

        status = {"acquired": frames, "used": frames, "round": len(rounds), "scan_finished": last}

        def step(it, cost, first=first, status=status):
            if it == 0:  # the round's run has begun (and reset the page): tell it the frames
                _tell_page(client, status)
            if progress is not None:
                progress(first + it, cost)

        try:
            res = reconstruct(ds, client=client, start=result, progress=step, **{**kwargs, "iterations": n_it})
        except OptionsError as e:
            if e.option == "tiles" and not last:  # the frames so far do not reach every tile yet
                wait_for_frames(path, frames + 1, timeout_s=timeout, poll_s=poll)
                continue
            raise
        result = res
        costs.extend(float(c) for c in res["cost"].values)
        used.extend([frames] * n_it)
        record = {"first_iteration": first, "iterations": n_it, "frames_used": frames, "scan_finished": last,
                  "started_s": started, "newest_commit_age_s": age, "seconds": time.monotonic() - t0 - started}
        rounds.append(record)
        if on_round is not None:
            on_round({**record, "result": res})
        if last:
            break
        now = stream_state(path)
        _tell_page(client, {"acquired": now.frames_complete, "used": frames, "round": len(rounds) - 1, "scan_finished": now.scan_finished})
        if now.frames_complete == frames:  # nothing new: wait a little before iterating on
            try:
                wait_for_frames(path, frames + 1, timeout_s=min(timeout, max(poll, 1.0)), poll_s=poll)
            except StreamStalledError:
                pass
    return _assemble(result, costs, used, rounds, last and not stopped, stopped)


def _tell_page(client, status):
    """The live page's frame counts (the page is optional: a scheduler without it is fine)."""
    if not config.get("dashboard.live", True):
        return
    try:
        client.run_on_scheduler(dashboard.follow_status, status)
    except Exception as e:  # noqa: BLE001 - the page is a view; the reconstruction goes on without it
        log.debug("no live page for the followed scan: %s", e)


def _assemble(result, costs, used, rounds, finished, stopped):
    out = result.drop_vars(["cost", "iteration"], errors="ignore")
    it = np.arange(len(costs))
    out = out.assign_coords(iteration=it).assign(
        cost=xr.DataArray(np.asarray(costs, dtype=np.float64), dims=("iteration",), attrs=dict(result["cost"].attrs)),
        frames_used=xr.DataArray(np.asarray(used, dtype=np.int64), dims=("iteration",),
                                 attrs={"long_name": "frames the iteration used (committed when its round started)"}))
    out.attrs.update(follow_rounds=json.dumps(rounds), scan_finished=bool(finished), writer_stopped=bool(stopped))
    return out
