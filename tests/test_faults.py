"""Lost workers: a worker process killed (SIGKILL, by its pid) in the middle of a run on
a real process LocalCluster with nannies; the run moves the lost tiles to the live
(restarted) workers, rolls back to the last checkpoint (or the start) and finishes
with exactly the undisturbed result."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

import dask
import numpy as np
import pytest

import daskptycho as dp
from daskptycho.engines.driver import RecoveryError

GD = dict(engine="gd", tiles=(2, 2), slices=2, refine_probe=True, probe_refine_start=2)
DM = dict(engine="dm", slices=1, probe_modes=2, probe_refine_start=2, partitions=2)


def _killer(client, at=4):
    """A progress callback that SIGKILLs the worker holding the last tiles at iteration ``at``
    (once, from a thread, as a crash would come)."""
    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)
    victim = sorted(pids)[-1]  # place_tiles gives the last worker the last tiles
    fired = []

    def progress(it, cost):
        if it == at and not fired:
            fired.append(victim)
            threading.Thread(target=os.kill, args=(pids[victim], signal.SIGKILL)).start()

    return progress, victim, fired


@pytest.mark.parametrize("kw, every", [(GD, 2), (DM, 0)], ids=["gd-from-checkpoint", "dm-from-start"])
def test_killed_worker_gives_the_undisturbed_result(small_pbtio3, client, tmp_path, caplog, kw, every):
    ds = dp.open_dataset(small_pbtio3)
    ref = dp.reconstruct(ds, iterations=8, client=client, **kw)
    progress, victim, fired = _killer(client)
    ck = dict(checkpoint=str(tmp_path / "out.zarr"), checkpoint_every=every) if every else {}
    with caplog.at_level(logging.WARNING, logger="daskptycho"):
        res = dp.reconstruct(ds, iterations=8, client=client, progress=progress, **ck, **kw)
    assert fired == [victim]
    for v in ("object", "probe", "cost"):
        assert np.array_equal(res[v].values, ref[v].values), v
    (rec,) = json.loads(res.attrs["recoveries"])
    assert rec["lost_workers"] == [victim]
    moved = rec["tiles_moved"] if kw is GD else rec["parts_moved"]
    assert moved and victim not in moved.values()
    if every:  # every tile rolled back to the checkpoint written after iteration 4 (the last complete one)
        assert rec["from"] == "checkpoint" and rec["resumed_from_iteration"] == 4
    else:
        assert rec["from"] == "start" and rec["resumed_from_iteration"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "daskptycho" and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and victim in lines[0] and "resuming from" in lines[0]


def test_workers_that_keep_dying_give_a_clear_error(small_pbtio3, client):
    ds = dp.open_dataset(small_pbtio3)
    progress, victim, fired = _killer(client, at=1)
    with dask.config.set({"daskptycho.recovery.max_recoveries": 0}):
        with pytest.raises(RecoveryError, match="workers keep dying"):
            dp.reconstruct(ds, iterations=6, client=client, progress=progress, **GD)
    assert fired
