"""Lost workers: a worker process killed (SIGKILL, by its pid) in the middle of a run on
a real process LocalCluster with nannies; the run moves the lost tiles to the live
(restarted) workers, rolls back to the last checkpoint (or the start) and finishes
with exactly the undisturbed result.

Two ways to kill: from the progress callback (after an iteration's cost came back),
and from the scheduler at a chosen moment of an iteration: a short random delay after
the first task of a phase (gradients, passes, update, a checkpoint write) of a given
iteration is sent to a worker. ``FAULT_SEED`` in the environment picks other moments
(``scripts/soak-faults.sh`` runs the file many times under load, each with its own seed).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import threading

import cloudpickle
import dask
import numpy as np
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin

import daskptycho as dp
from daskptycho.errors import PeerExchangeError, RecoveryError, WorkerLost
from daskptycho.tasks.updates import AUTO_MINIBATCHES

# the scheduler plugin below travels to the scheduler by value, whatever its sys.path
cloudpickle.register_pickle_by_value(sys.modules[__name__])

GD = dict(engine="gd", tiles=(2, 2), slices=2, refine_probe=True, probe_refine_start=2)
DM = dict(engine="dm", slices=1, probe_modes=2, probe_refine_start=2, partitions=2)
ENGINES = {"gd": GD, "dm": DM}
ITERATIONS = 8
EVERY = 2  # checkpoints after iterations 2, 4, 6, 8


def _victim(client):
    """The worker holding the last tiles (place_tiles gives them to the last worker) and its pid."""
    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)
    victim = sorted(pids)[-1]
    return victim, pids[victim]


def _killer(client, at=4):
    """A progress callback that SIGKILLs the worker holding the last tiles at iteration ``at``
    (once, from a thread, as a crash would come)."""
    victim, pid = _victim(client)
    fired = []

    def progress(it, cost):
        if it == at and not fired:
            fired.append(victim)
            threading.Thread(target=os.kill, args=(pid, signal.SIGKILL)).start()

    return progress, victim, fired


_refs = {}


@pytest.fixture(autouse=True)
def _nannies_outlive_quick_repeat_losses():
    """These tests lose the same worker name several times within seconds. distributed's
    SpecCluster closes a worker's nanny for good when, ``lost-worker-timeout`` (15 s) after
    a loss, no worker of that name is registered, which a later loss in the next test can
    cause; the tests then would start with one worker instead of two."""
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}):
        yield


def _reference(ds, client, name, **kw):
    """The undisturbed result of an engine setting (computed once per module)."""
    if name not in _refs:
        _refs[name] = dp.reconstruct(ds, iterations=ITERATIONS, client=client, **kw)
    return _refs[name]


def _check_recovery(res, ref, victim, kw, caplog, every):
    for v in ("object", "probe", "cost"):
        assert np.array_equal(res[v].values, ref[v].values), v
    (rec,) = json.loads(res.attrs["recoveries"])
    assert rec["lost_workers"] == [victim]
    moved = rec["tiles_moved"] if kw is GD else rec["parts_moved"]
    assert moved and victim not in moved.values()
    if every:  # rolled back to a checkpoint that existed: one written before the loss
        assert rec["from"] == "checkpoint", rec
        assert rec["resumed_from_iteration"] % every == 0 and 0 < rec["resumed_from_iteration"] <= rec["at_iteration"], rec
    else:
        assert rec["from"] == "start" and rec["resumed_from_iteration"] == 0, rec
    lines = [r.getMessage() for r in caplog.records if r.name == "daskptycho" and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and victim in lines[0] and "resuming from" in lines[0], lines


@pytest.mark.parametrize("kw, every", [(GD, EVERY), (DM, 0)], ids=["gd-from-checkpoint", "dm-from-start"])
def test_killed_worker_gives_the_undisturbed_result(small_pbtio3, client, tmp_path, caplog, kw, every):
    ds = dp.open_dataset(small_pbtio3)
    ref = _reference(ds, client, kw["engine"], **kw)
    progress, victim, fired = _killer(client)
    ck = dict(checkpoint=str(tmp_path / "out.zarr"), checkpoint_every=every) if every else {}
    with caplog.at_level(logging.WARNING, logger="daskptycho"):
        res = dp.reconstruct(ds, iterations=ITERATIONS, client=client, progress=progress, **ck, **kw)
    assert fired == [victim]
    _check_recovery(res, ref, victim, kw, caplog, every)


#: the tasks that open each moment of an iteration (their key's first element)
MOMENTS = {
    "gradients": {"grad", "dm-views"},
    "passes": {"vfwd-strip", "vbwd-strip", "hfwd-strip", "hbwd-strip", "dm-sum"},
    "update": {"update", "dm-object-update", "dm-crop"},
    "checkpoint-write": {"checkpoint", "checkpoint-object"},
}


class KillDuring(SchedulerPlugin):
    """On the scheduler: SIGKILL the process ``pid`` ``delay`` seconds after the first
    task named in ``names`` of iteration (gd: pass round) ``at`` or later is sent to a
    worker (once)."""

    name = "daskptycho-test-kill"

    def __init__(self, pid, names, at, delay):
        self.pid, self.names, self.at, self.delay = pid, set(names), at, delay
        self.fired_at = None

    def transition(self, key, start, finish, *args, **kwargs):
        if self.fired_at is not None or finish != "processing" or not isinstance(key, tuple) or len(key) < 3:
            return
        if key[0] in self.names and isinstance(key[1], int) and key[1] >= self.at:
            self.fired_at = key
            threading.Timer(self.delay, os.kill, (self.pid, signal.SIGKILL)).start()


def _fired_at(dask_scheduler=None):
    plugin = dask_scheduler.plugins.get(KillDuring.name)
    return None if plugin is None else repr(plugin.fired_at)


@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_worker_killed_at_any_moment_of_an_iteration(small_pbtio3, client, tmp_path, caplog, engine, moment):
    kw = ENGINES[engine]
    ds = dp.open_dataset(small_pbtio3)
    ref = _reference(ds, client, engine, **kw)
    victim, pid = _victim(client)
    seed = f"{engine}-{moment}-{os.environ.get('FAULT_SEED', '0')}"
    delay = random.Random(seed).uniform(0.0, 0.05)  # into the phase, not only at its first task
    # gd's iteration tasks count pass rounds: 4 per iteration here (the default minibatch
    # rounds); checkpoints count iterations
    at = 3 * (AUTO_MINIBATCHES if engine == "gd" and moment != "checkpoint-write" else 1)
    client.register_plugin(KillDuring(pid, MOMENTS[moment], at=at, delay=delay))
    # the tile graph, whose tasks open each moment (a peer run: test_worker_killed_inside_a_peer_stage)
    try:
        with dask.config.set({"daskptycho.schedule.exchange": "scheduler"}), caplog.at_level(logging.WARNING, logger="daskptycho"):
            res = dp.reconstruct(ds, iterations=ITERATIONS, client=client, checkpoint=str(tmp_path / "out.zarr"),
                                 checkpoint_every=EVERY, **kw)
        fired = client.run_on_scheduler(_fired_at)
    finally:
        client.unregister_scheduler_plugin(KillDuring.name)
    assert fired != "None", f"no {moment} task of iteration >= 3 was scheduled"
    _check_recovery(res, ref, victim, kw, caplog, EVERY)


def test_workers_that_keep_dying_give_a_clear_error(small_pbtio3, client):
    ds = dp.open_dataset(small_pbtio3)
    progress, victim, fired = _killer(client, at=1)
    with dask.config.set({"daskptycho.recovery.max_recoveries": 0}):
        with pytest.raises(RecoveryError, match="workers keep dying"):
            dp.reconstruct(ds, iterations=6, client=client, progress=progress, **GD)
    assert fired


def test_ml_recovers_on_another_worker(small_pbtio3, client, tmp_path, caplog):
    """ml's one unit (the whole object and every pattern) moves to a live worker and rolls
    back to its last checkpoint: the result is the undisturbed one, bit for bit."""
    ds = dp.open_dataset(small_pbtio3)
    kw = dict(engine="ml", slices=2, refine_probe=True, probe_refine_start=2)
    ref = _reference(ds, client, "ml", **kw)
    client.wait_for_workers(2, timeout=60)
    victim = sorted(client.nthreads())[0]  # the run's one unit goes to the first worker
    pid = client.run(os.getpid)[victim]
    fired = []

    def progress(it, cost):
        if it == 4 and not fired:
            fired.append(it)
            threading.Thread(target=os.kill, args=(pid, signal.SIGKILL)).start()

    with caplog.at_level(logging.WARNING, logger="daskptycho"):
        res = dp.reconstruct(ds, iterations=ITERATIONS, client=client, progress=progress, checkpoint=str(tmp_path / "ml.zarr"),
                             checkpoint_every=EVERY, **kw)
    assert fired
    for v in ("object", "probe", "cost"):
        assert np.array_equal(res[v].values, ref[v].values), v
    (rec,) = json.loads(res.attrs["recoveries"])
    assert rec["lost_workers"] == [victim] and victim not in rec["tiles_moved"].values()
    assert rec["from"] == "checkpoint" and rec["resumed_from_iteration"] % EVERY == 0


def test_killed_worker_during_a_fused_run_gives_the_undisturbed_result(small_pbtio3, client, tmp_path, caplog):
    # each worker's tiles run as a few stage tasks (schedule/fuse.py); its states live inside
    # those stages' results: the recovery must still roll back and finish bit-identically
    ds = dp.open_dataset(small_pbtio3)
    ref = _reference(ds, client, "gd", **GD)
    progress, victim, fired = _killer(client)
    with dask.config.set({"daskptycho.schedule.fuse": "always", "daskptycho.schedule.exchange": "scheduler"}), caplog.at_level(logging.WARNING, logger="daskptycho"):
        res = dp.reconstruct(ds, iterations=ITERATIONS, client=client, progress=progress, checkpoint=str(tmp_path / "out.zarr"),
                             checkpoint_every=EVERY, **GD)
    assert fired == [victim]
    _check_recovery(res, ref, victim, GD, caplog, EVERY)


def test_killed_worker_during_a_peer_run_gives_the_undisturbed_result(small_pbtio3, client, tmp_path, caplog):
    # strips go worker to worker inside blocks of iterations (tasks/peer.py): the survivor's
    # stage, waiting for a message from the dead worker, must be aborted, and the run roll
    # back and finish bit-identically
    ds = dp.open_dataset(small_pbtio3)
    ref = _reference(ds, client, "gd", **GD)
    progress, victim, fired = _killer(client, at=3)
    cfg = {"daskptycho.schedule.exchange": "peer", "daskptycho.schedule.block_iterations": 2}
    with dask.config.set(cfg), caplog.at_level(logging.WARNING, logger="daskptycho"):
        res = dp.reconstruct(ds, iterations=ITERATIONS, client=client, progress=progress, checkpoint=str(tmp_path / "out.zarr"),
                             checkpoint_every=EVERY, **GD)
    assert fired == [victim]
    _check_recovery(res, ref, victim, GD, caplog, EVERY)


def test_worker_killed_inside_a_peer_stage(small_pbtio3, client, tmp_path, caplog):
    # killed while the blocks' stages compute and exchange strips worker to worker
    ds = dp.open_dataset(small_pbtio3)
    ref = _reference(ds, client, "gd", **GD)
    victim, pid = _victim(client)
    delay = random.Random(f"peer-{os.environ.get('FAULT_SEED', '0')}").uniform(0.0, 0.05)
    client.register_plugin(KillDuring(pid, {"stage"}, at=3 * AUTO_MINIBATCHES, delay=delay))  # stages are numbered by pass round
    cfg = {"daskptycho.schedule.exchange": "peer", "daskptycho.schedule.block_iterations": 2}
    try:
        with dask.config.set(cfg), caplog.at_level(logging.WARNING, logger="daskptycho"):
            res = dp.reconstruct(ds, iterations=ITERATIONS, client=client, checkpoint=str(tmp_path / "out.zarr"),
                                 checkpoint_every=EVERY, **GD)
        fired = client.run_on_scheduler(_fired_at)
    finally:
        client.unregister_scheduler_plugin(KillDuring.name)
    assert fired != "None", "no stage of iteration >= 3 was scheduled"
    _check_recovery(res, ref, victim, GD, caplog, EVERY)


def _break_a_message_to(pid):
    """On a worker: what a stage does when the peer it writes to dies under it (the
    broken message fails at once, before the scheduler can know of the death)."""
    os.kill(pid, signal.SIGKILL)
    raise PeerExchangeError("a message over its same-host socket failed: BrokenPipeError(32, 'Broken pipe')")


def _raise_a_peer_error():
    raise PeerExchangeError("stage ('stage', 0): messages [1] did not arrive within 0.1 s")


def test_a_broken_peer_message_from_a_death_is_a_lost_worker_not_an_error(client):
    # the survivor's task errs before the scheduler has removed the dead worker: the driver
    # must wait for the scheduler to see the loss and recover, not fail the run
    from daskptycho.engines.driver import Driver

    victim, pid = _victim(client)
    survivor = next(a for a in client.nthreads() if a != victim)
    with Driver(client=client) as drv, pytest.raises(WorkerLost) as lost:
        f = client.submit(_break_a_message_to, pid, workers=[survivor], pure=False)
        drv.wait_alive([f], {0: survivor, 1: victim})
    assert lost.value.lost == [victim]
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it for the tests after this one


def test_a_peer_error_with_every_worker_alive_is_raised_as_it_is(client):
    from daskptycho.engines.driver import Driver

    placement = dict(enumerate(sorted(client.nthreads())))
    f = client.submit(_raise_a_peer_error, workers=[placement[0]], pure=False)
    with Driver(client=client) as drv, dask.config.set({"daskptycho.recovery.poll_s": 0.05}):
        with pytest.raises(PeerExchangeError, match="did not arrive"):
            drv.wait_alive([f], placement)
