"""What every tiled engine does after losing a worker (gd, hve and dm share it)."""

from __future__ import annotations

import json
import logging

from .driver import RecoveryError


def roll_back(run, err, *, units, label):
    """Move the lost units to live workers and find the state to restart from.

    The caller has already dropped its futures of the interrupted attempt (released,
    the scheduler forgets the tasks pinned to the lost worker; cancelling them trips a
    scheduler assertion). Patterns stay where their worker lives; the lost units
    reload theirs from the store.

    Parameters
    ----------
    run : the engine's run object
        With ``drv``, ``workers`` ({unit: address}), ``n_workers``, ``data``
        ({unit: Future of patterns}), ``source``, ``ck`` (checkpoint or None),
        ``costs``, ``recoveries``, ``max_recoveries``; ``workers`` and ``meta`` (the
        latest complete checkpoint's metadata, or None) are set here.
    err : LostWorker
        The error that revealed the loss (``err.lost``: the lost addresses).
    units : str
        What the units are called in the record and the log ("tiles", "dm parts").
    label : callable(unit) -> str
        The unit's name in the record.

    Returns
    -------
    int
        The iteration to restart from (0: the start, no checkpoint).
    """
    at = len(run.costs)
    if len(run.recoveries) >= run.max_recoveries:
        raise RecoveryError(f"workers keep dying: {len(run.recoveries)} recoveries already (daskptycho.recovery.max_recoveries); "
                            f"last at iteration {at}: {err}")
    before = run.workers
    run.workers, moved = run.drv.replace_tiles(before, expected_workers=run.n_workers)
    # the error may have come before the scheduler named the worker (a cancelled key)
    lost = sorted(set(err.lost) | {before[k] for k in moved})
    for k in list(run.data):
        if k in moved or run.data[k].status != "finished":
            del run.data[k]
    if not isinstance(run.source, str) and getattr(run.source, "status", "finished") != "finished":
        raise RecoveryError(f"{err}; the patterns were scattered from memory and are lost with it: "
                            "reconstruct from a store (daskptycho.write_dataset) to survive lost workers")
    run.meta = run.ck.latest() if run.ck is not None else None
    frm = int(run.meta["completed"]) if run.meta else 0
    key = units.split()[-1] + "_moved"
    moved_to = {label(k): run.workers[k] for k in moved}
    run.recoveries.append({"at_iteration": at, "lost_workers": lost, key: moved_to,
                           "resumed_from_iteration": frm, "from": "checkpoint" if run.meta else "start"})
    logging.getLogger("daskptycho").warning(
        "lost worker %s at iteration %d; %s %s moved to %s; resuming from %s",
        ", ".join(lost) or "(unknown)", at, units, " ".join(moved_to) or "(none)", json.dumps(sorted(set(moved_to.values()))),
        f"the checkpoint after iteration {frm}" if run.meta else "the start (no checkpoint)")
    return frm
