"""Peer exchange (``daskptycho.schedule.exchange: peer``, tasks/peer.py): fused stages send
the values other workers' tiles need straight to those workers, blocks of iterations
run as one stage per worker, and the results are bit for bit those of the tile graph.
A real process LocalCluster; a stage that fails, or a message that never comes, ends
the others' waits instead of hanging them."""

from __future__ import annotations

import json
import os
import socket
import time

import dask
import numpy as np
import pytest
from distributed import wait
from distributed.diagnostics.plugin import SchedulerPlugin

import daskptycho as dp
from daskptycho.engines import engine_options
from daskptycho.engines.gd import block_ends
from daskptycho.errors import OptionsError, PeerExchangeError
from daskptycho.tasks import peer
from daskptycho.tasks.stage import Slot, StageSpec

ITERATIONS = 7


def _run(ds, client, exchange, block=2, **kw):
    # blocks of 2 over 7 iterations: later blocks reuse the first one's fused graph (rebound)
    cfg = {"daskptycho.schedule.exchange": exchange, "daskptycho.schedule.block_iterations": block}
    with dask.config.set(cfg):
        return dp.reconstruct(ds, iterations=ITERATIONS, client=client, **kw)


def _same(a, b):
    for v in ("object", "probe", "cost"):
        assert np.array_equal(a[v].values, b[v].values), v


@pytest.mark.parametrize("kw", [
    dict(engine="gd", tiles=(3, 3), slices=2, refine_probe=True, probe_refine_start=2),
    dict(engine="gd", tiles=(2, 2), slices=2, passes_per_iteration=2, local_updates=True, batch_size=8),
    dict(engine="hve", tiles=(2, 2), slices=2),
], ids=["gd-3x3-probe", "gd-rounds-local", "hve"])
def test_peer_exchange_gives_the_tile_graphs_result(small_pbtio3, client, kw):
    ds = dp.open_dataset(small_pbtio3)
    with dask.config.set({"daskptycho.schedule.fuse": "never"}):
        ref = _run(ds, client, "scheduler", **kw)
    got = _run(ds, client, "peer", **kw)
    _same(got, ref)
    assert len(got["cost"]) == ITERATIONS


def test_peer_blocks_stop_at_checkpoints_and_resume_exactly(small_pbtio3, client, tmp_path):
    ds = dp.open_dataset(small_pbtio3)
    kw = dict(engine="gd", tiles=(2, 2), slices=2, minibatch_fraction=1.0)  # the resumed run extends the total
    ref = _run(ds, client, "scheduler", **kw)
    out = tmp_path / "ck.zarr"
    # checkpoints after iterations 2 and 4: blocks of 4 must stop there
    with dask.config.set({"daskptycho.schedule.exchange": "peer", "daskptycho.schedule.block_iterations": 4}):
        dp.reconstruct(ds, iterations=4, client=client, checkpoint=str(out), checkpoint_every=2, **kw)
        got = dp.reconstruct(ds, iterations=ITERATIONS, client=client, checkpoint=str(out), checkpoint_every=2, resume=True, **kw)
    _same(got, ref)


def test_a_runs_block_shapes_are_all_built_before_its_first_block_runs(small_pbtio3, client, monkeypatch):
    # a shape built mid-run would take a core from a worker while the others wait for it at
    # the rounds' barriers: the first block builds them all, and the later blocks only rebind
    from daskptycho.engines.gd import TiledRun

    ds = dp.open_dataset(small_pbtio3)
    kw = dict(engine="gd", tiles=(2, 2), slices=2, refine_probe=True, probe_refine_start=3)
    ref = _run(ds, client, "scheduler", **kw)
    events = []
    build, submit = TiledRun._block_template, TiledRun._submit_fused

    def building(self, block, refine, moves):
        if (len(block), refine, moves, self.block_kind(block)) not in self._blocks:
            events.append(("build", block[0]))
        return build(self, block, refine, moves)

    def submitting(self, fused, where):
        events.append(("submit", None))
        return submit(self, fused, where)

    monkeypatch.setattr(TiledRun, "_block_template", building)
    monkeypatch.setattr(TiledRun, "_submit_fused", submitting)
    got = _run(ds, client, "peer", **kw)  # blocks of 2 over 7 iterations: 0-1, 2-3, 4 (minibatches end), 5-6
    _same(got, ref)
    kinds = [k for k, _ in events]
    # shapes: no refinement yet (0-1), refinement from 3 (2-3), the last minibatch (4), full batch (5-6)
    assert [it for k, it in events if k == "build"] == [0, 2, 4, 5], events
    assert kinds == ["build"] * 4 + ["submit"] * 4, events


class _CostTasks(SchedulerPlugin):
    """The keys of the cost tasks the scheduler runs (from its registration on)."""

    name = "test-cost-tasks"

    def __init__(self):
        self.seen = set()

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "processing" and isinstance(key, tuple) and key[0] in ("cost", "costs"):
            self.seen.add(key)


def test_a_peer_blocks_costs_are_one_task_fetched_once(small_pbtio3, client, monkeypatch):
    # the scheduler runs one cost task per block (not one per iteration), the client fetches
    # it once for the block's iterations, and the costs are the tile graph's, bit for bit
    from daskptycho.engines.run import PinnedRun

    ds = dp.open_dataset(small_pbtio3)
    kw = dict(engine="gd", tiles=(2, 2), slices=2)
    with dask.config.set({"daskptycho.schedule.fuse": "never"}):
        ref = _run(ds, client, "scheduler", **kw)
    client.register_plugin(_CostTasks())
    fetched = []
    real = PinnedRun._fetch

    def counting(self, futures, shared):
        fetched.extend(f.key for f in futures if f is not None and (not shared or f.key not in self.fetched))
        return real(self, futures, shared)

    monkeypatch.setattr(PinnedRun, "_fetch", counting)
    with dask.config.set({"daskptycho.schedule.exchange": "peer", "daskptycho.schedule.block_iterations": 4}):
        got = dp.reconstruct(ds, iterations=ITERATIONS, client=client, **kw)
    _same(got, ref)

    tasks = sorted(client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[_CostTasks.name].seen))
    client.unregister_scheduler_plugin(_CostTasks.name)
    # 7 iterations in blocks of up to 4, cut where the first 5 (minibatches) end, the one
    # minibatch iteration left joining the first block: 0-4, 5-6
    assert block_ends(ITERATIONS, 4, engine_options(iterations=ITERATIONS).minibatch_iterations()) == [4, 6]
    assert [k[0] for k in tasks] == ["costs"] * 2, tasks
    assert sorted(fetched) == sorted(tasks)
    # the result says where each block's costs, which reach the client together, end (the
    # CLI's steady-state time per iteration starts at the first of them)
    assert json.loads(got.attrs["peer_block_ends"]) == [4, 6]


def test_a_block_starts_from_its_own_workers_values(small_pbtio3, client):
    # after the first block each worker's stage reads its own tiles' states and its own copy
    # of the probe (stepped there from the same sums): no stage's result crosses workers
    # (a stage result holds its worker's tiles; one fetched by the other worker to read the
    # probe out of it was measured at 1.6 MB per block on the default run), and the result
    # is the tile graph's, bit for bit
    ds = dp.open_dataset(small_pbtio3)
    kw = dict(engine="gd", tiles=(2, 2), slices=2, refine_probe=True, probe_refine_start=1)
    with dask.config.set({"daskptycho.schedule.fuse": "never"}):
        ref = _run(ds, client, "scheduler", **kw)
    client.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())
    with dask.config.set({"daskptycho.schedule.exchange": "peer", "daskptycho.schedule.block_iterations": 2}):
        got = dp.reconstruct(ds, iterations=ITERATIONS, client=client, **kw)
    _same(got, ref)
    logs = client.run(lambda dask_worker: [k for e in dask_worker.transfer_incoming_log for k in e["keys"]])
    moved = [k for keys in logs.values() for k in keys if isinstance(k, tuple)]
    assert moved and not [k for k in moved if k[0] == "stage"], moved


def test_a_probe_relayed_down_the_tree_of_workers_gives_the_same_result(small_pbtio3, client):
    # one stepper: the second worker's tiles read the probe relayed from the first worker
    # instead of the copy they step from the halves of the sum; the bits are the same
    ds = dp.open_dataset(small_pbtio3)
    kw = dict(engine="gd", tiles=(2, 2), slices=2, refine_probe=True, probe_refine_start=2)
    ref = _run(ds, client, "peer", **kw)
    with dask.config.set({"daskptycho.schedule.probe_steppers": 1}):
        _same(_run(ds, client, "peer", **kw), ref)
        _same(_run(ds, client, "scheduler", **kw), ref)


def test_peer_settings_are_checked(small_pbtio3, client):
    ds = dp.open_dataset(small_pbtio3)
    with dask.config.set({"daskptycho.schedule.exchange": "carrier-pigeon"}):
        with pytest.raises(OptionsError, match="schedule.exchange"):
            dp.reconstruct(ds, iterations=1, client=client, engine="gd", tiles=(2, 2))
    with dask.config.set({"daskptycho.schedule.exchange": "peer", "daskptycho.schedule.block_iterations": 0}):
        with pytest.raises(OptionsError, match="block_iterations"):
            dp.reconstruct(ds, iterations=1, client=client, engine="gd", tiles=(2, 2))
    with dask.config.set({"daskptycho.schedule.probe_steppers": 0}):
        with pytest.raises(OptionsError, match="probe_steppers"):
            dp.reconstruct(ds, iterations=1, client=client, engine="gd", tiles=(2, 2), refine_probe=True)


def _fail(x):
    raise ValueError("a tile task failed")


def _stages(channel, a, b, first, timeout_s=600.0):
    """Two one-task stages: ``a``'s task computes ``first(1)`` and sends it to ``b``, whose
    task adds one to what it receives."""
    sa = peer.PeerStage(StageSpec(((("x",), (first, 1)),), ()), channel, ((("x",), 7, (b,)),), (b,), timeout_s)
    sb = peer.PeerStage(StageSpec(((("y",), (np.add, peer.Receive(7), 1)),), (("y",),)), channel, (), (a,), timeout_s)
    return sa, sb


def _submit(client, channel, first):
    client.register_plugin(peer.PeerExchange())
    a, b = sorted(client.nthreads())
    sa, sb = _stages(channel, a, b, first)
    fb = client.submit(peer.run_peer_stage, sb, key=f"peer-b-{channel}", workers=[b], allow_other_workers=False, pure=False)
    time.sleep(0.2)  # b waits first
    fa = client.submit(peer.run_peer_stage, sa, key=f"peer-a-{channel}", workers=[a], allow_other_workers=False, pure=False)
    return fa, fb


def test_a_message_crosses_workers(client):
    fa, fb = _submit(client, "t1|0", np.negative)
    assert fb.result(timeout=60) == {("y",): 0}
    assert fa.result(timeout=60) == {}


def test_a_failed_stage_ends_its_peers_waits(client):
    t0 = time.monotonic()
    fa, fb = _submit(client, "t2|0", _fail)
    wait([fa, fb], timeout=120)
    assert time.monotonic() - t0 < 100  # told by the failed stage, not by the 600 s timeout
    with pytest.raises(ValueError, match="a tile task failed"):
        fa.result()
    with pytest.raises(PeerExchangeError, match="failed"):
        fb.result()


def test_a_message_that_never_comes_times_out(client):
    client.register_plugin(peer.PeerExchange())
    a, b = sorted(client.nthreads())
    _, sb = _stages("t3|0", a, b, np.negative, timeout_s=1.0)
    fb = client.submit(peer.run_peer_stage, sb, key="peer-b-t3", workers=[b], allow_other_workers=False, pure=False)
    with pytest.raises(PeerExchangeError, match="did not arrive within 1 s"):
        fb.result(timeout=120)


def test_the_driver_aborts_an_attempt(client):
    client.register_plugin(peer.PeerExchange())
    a, b = sorted(client.nthreads())
    _, sb = _stages("t4|0", a, b, np.negative)
    fb = client.submit(peer.run_peer_stage, sb, key="peer-b-t4", workers=[b], allow_other_workers=False, pure=False)
    time.sleep(0.5)
    client.run(peer.abort, "t4", "lost worker x")
    with pytest.raises(PeerExchangeError, match="lost worker x"):
        fb.result(timeout=120)


def test_a_tasks_reads_are_its_in_stage_values_and_messages():
    # what a task of a peer stage reads: values computed earlier in the stage, and messages
    spec = StageSpec(((("a",), (np.add, Slot(0), 1)), (("b",), (np.multiply, Slot(None, ("a",)), 2))), (("b",),))
    assert peer._reads(spec.tasks[1][1], set(), set()) == ({("a",)}, set())
    assert peer._reads((np.add, peer.Receive(3), [Slot(None, "k")]), set(), set()) == ({"k"}, {3})


def test_a_stage_body_is_planned_once_for_all_its_blocks():
    # every block of a shape runs the same body with its own channel: the dataflow's plan
    # (who reads what) is worked out once, is the body's own, and goes with the body
    import dataclasses
    import gc

    body = peer.PeerStage(StageSpec(((("a",), (np.add, Slot(0), 1)), (("b",), (np.add, Slot(None, ("a",)), peer.Receive(4)))),
                                    (("b",),)), "t|0", ((("a",), 3, ("w2",)),), ("w2",), 10.0)
    assert peer.stage_body(body) is body  # planned as it arrives on its worker
    plan = peer._PLANS[id(body.stage)][1]
    assert peer._plan(dataclasses.replace(body, channel="t|8")) is plan
    assert plan.missing == (0, 2) and plan.readers_of_key == {("a",): (1,)} and plan.readers_of_msg == {4: (1,)}
    other = dataclasses.replace(body, sends=((("a",), 3, ("w3",)),))  # the same tasks sent elsewhere
    assert peer._plan(other) is not plan and peer._plan(other).sends == {("a",): (3, ("w3",))}
    key = id(body.stage)
    del body, other, plan
    gc.collect()
    assert key not in peer._PLANS


def test_mailbox_hands_each_stage_its_own_messages():
    # two stages of one worker may share a block's channel: a poll takes only the messages
    # it awaits, the others stay for the other stage, and an abort drops the tag's messages
    box = peer._Mailbox()
    box.put("t|0", [(1, "a"), (2, "b")])  # one message may carry several values
    box.put("t|8", [(1, "next block")])
    assert box.poll("t|0", {2, 5}) == {2: "b"}
    assert box.poll("t|0", {2, 5}) == {}
    box.put("t|0", [(5, "e")])
    assert box.poll("t|0", {1, 5}) == {1: "a", 5: "e"}
    assert box.poll("t|8", {1}) == {1: "next block"}
    box.put("u|0", [(3, "other run")])
    box.abort("u", "lost worker")
    assert box.poll("u|0", {3}) == {} and not box.box
    with pytest.raises(PeerExchangeError, match="lost worker"):
        box.check("u|0")


def test_values_for_a_peer_cut_in_a_row_leave_as_one_message(monkeypatch):
    # the values a stage cuts for a peer while it runs quick tasks travel together; a task
    # that was slow (or has not run yet) and the end of the stage send what is held first
    import concurrent.futures

    class Plugin:
        def __init__(self):
            self.mailbox, self.sent, self.timeline, self.took = peer._Mailbox(), [], None, {}

        def send(self, address, channel, items, timeout):
            self.sent.append((address, [m for m, _ in items], time.perf_counter()))
            f = concurrent.futures.Future()
            f.set_result(None)
            return f

    monkeypatch.setattr(peer, "QUICK_S", 0.05)  # a margin no busy machine's hiccup on a tiny task reaches
    started = []

    def slow(x):
        started.append(time.perf_counter())
        time.sleep(0.2)
        return x

    tasks = ((("strip", 0), (np.add, Slot(0), 0)), (("strip", 1), (np.add, Slot(0), 1)),
             (("slow", 0), (slow, Slot(None, ("strip", 1)))), (("strip", 2), (np.add, Slot(None, ("slow", 0)), 2)),
             (("strip", 3), (np.add, Slot(0), 3)))
    sends = tuple((("strip", i), 10 + i, ("w2",)) for i in range(4))
    spec = peer.PeerStage(StageSpec(tasks, (("slow", 0), ("strip", 3))), "t|0", sends, ("w2",), 10.0)
    plugin = Plugin()
    out = peer._run(spec, (100,), plugin, 10.0)
    assert out == {("slow", 0): 101, ("strip", 3): 103}
    assert [(a, m) for a, m, _ in plugin.sent] == [("w2", [10, 11]), ("w2", [12, 13])]
    assert plugin.sent[0][2] < started[0]  # held only while quick tasks ran, not behind the slow one

    # a round's end: a strip and a probe part for the peer, and the stage's own step of its
    # tile between them in the builder's order. The part's producer runs first, the two
    # values leave together, and only then the step: the peer does not wait for this
    # stage's own work. (Kinds that ran before count as quick, as in a block's later rounds.)
    stepped = []

    def step(x):
        stepped.append(time.perf_counter())
        return x

    tasks = ((("grad", 0), (np.add, Slot(0), 0)), (("strip", 0), (np.add, Slot(None, ("grad", 0)), 1)),
             (("step", 0), (step, Slot(None, ("grad", 0)))), (("part", 0), (np.add, Slot(None, ("grad", 0)), 2)),
             (("sum", 0), (np.add, Slot(None, ("part", 0)), 3)))
    sends = ((("strip", 0), 20, ("w2",)), (("sum", 0), 21, ("w2",)))
    spec = peer.PeerStage(StageSpec(tasks, (("step", 0), ("sum", 0))), "t|1", sends, ("w2",), 10.0)
    plugin = Plugin()
    plugin.took.update(dict.fromkeys(("grad", "strip", "step", "part", "sum"), 0.0))
    out = peer._run(spec, (100,), plugin, 10.0)
    assert out == {("step", 0): 100, ("sum", 0): 105}
    assert [(a, m) for a, m, _ in plugin.sent] == [("w2", [20, 21])]
    assert plugin.sent[0][2] < stepped[0]


def _strips(x):
    # what a gd stage sends: dicts of arrays, one of them not contiguous, and a scalar
    a = np.arange(40_000, dtype=np.complex64).reshape(200, 200) * (1 + 2j)
    return {"object": a[:, 50:150], "illumination": np.full((3, 7), 0.25, np.float32), "cost": np.float64(x) / 3}


def test_same_host_peers_message_over_their_sockets(client):
    # both workers run on this machine: a's stage writes to b's Unix socket itself, and
    # b's reader thread fills its mailbox; the value arrives bit for bit
    a, b = sorted(client.nthreads())
    client.register_plugin(peer.PeerExchange())
    sa = peer.PeerStage(StageSpec(((("x",), (_strips, 1)),), ()), "t5|0", ((("x",), 7, (b,)),), (b,), 600.0)
    sb = peer.PeerStage(StageSpec(((("y",), (dict, peer.Receive(7))),), (("y",),)), "t5|0", (), (a,), 600.0)
    fb = client.submit(peer.run_peer_stage, sb, key="peer-b-t5", workers=[b], allow_other_workers=False, pure=False)
    fa = client.submit(peer.run_peer_stage, sa, key="peer-a-t5", workers=[a], allow_other_workers=False, pure=False)
    got = fb.result(timeout=120)[("y",)]
    fa.result(timeout=120)
    want = _strips(1)
    assert got.keys() == want.keys()
    for k in want:
        assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype and np.array_equal(got[k], want[k]), k

    def links(dask_worker):
        import os
        import stat

        p = dask_worker.plugins[peer.NAME]
        return ({addr: link is not None for addr, link in p._local.items()},
                stat.S_IMODE(os.stat(os.path.dirname(p.inbox.path)).st_mode))

    seen = client.run(links)
    assert seen[a][0].get(b) is True  # a reached b over its socket, not over the comm
    assert seen[a][1] == seen[b][1] == 0o700  # no other user can reach the sockets


def test_a_workers_timeline_records_its_stages_tasks_waits_and_messages(client):
    # while recording, a's stage notes its task and the message it sends (with its bytes),
    # b's its wait, the message it reads and its task; each stage as a whole; then nothing more
    a, b = sorted(client.nthreads())
    client.register_plugin(peer.PeerExchange())
    assert set(client.run(peer.record_timeline, True).values()) == {True}
    sa = peer.PeerStage(StageSpec(((("x",), (_strips, 1)),), ()), "t9|0", ((("x",), 7, (b,)),), (b,), 600.0)
    sb = peer.PeerStage(StageSpec(((("y",), (dict, peer.Receive(7))),), (("y",),)), "t9|0", (), (a,), 600.0)
    fb = client.submit(peer.run_peer_stage, sb, key="peer-b-t9", workers=[b], allow_other_workers=False, pure=False)
    time.sleep(0.2)  # b waits first
    fa = client.submit(peer.run_peer_stage, sa, key="peer-a-t9", workers=[a], allow_other_workers=False, pure=False)
    fb.result(timeout=120), fa.result(timeout=120)
    got = client.run(peer.take_timeline)
    want_bytes = sum(np.asarray(v).nbytes for v in _strips(1).values())
    ta, tb = got[a], got[b]
    assert [e[1] for e in ta if e[0] == "task"] == ["x"] and [e[1] for e in tb if e[0] == "task"] == ["y"]
    send = [e for e in ta if e[0] == "send"]
    assert len(send) == 1 and send[0][1] == "t9|0" and send[0][4] == want_bytes
    read = [e for e in tb if e[0] == "receive"]
    assert len(read) == 1 and read[0][1] == "t9|0" and read[0][4] > want_bytes  # the arrays and their description
    assert read[0][3] >= send[0][2]  # read after it was sent (one clock for both processes)
    assert all(e[2] <= e[3] for e in tb if e[0] == "wait")  # b may or may not have had to wait, by when it started
    for ev in (ta, tb):
        stage = [e for e in ev if e[0] == "stage"]
        task = next(e for e in ev if e[0] == "task")
        assert len(stage) == 1 and stage[0][2] <= task[2] <= task[3] <= stage[0][3] and 0 <= task[4]
    assert client.run(peer.take_timeline) == {a: [], b: []}  # taken once
    client.run(peer.record_timeline, False)
    fa, fb = _submit(client, "t10|0", np.negative)
    fb.result(timeout=60), fa.result(timeout=60)
    assert client.run(peer.take_timeline) == {a: [], b: []}  # not recording


def _bounded_timeline(n, dask_worker=None):
    peer.TIMELINE_EVENTS = n
    return peer.record_timeline(True, dask_worker=dask_worker)


def test_a_timeline_keeps_the_last_events_only(client):
    # a recording left on does not grow without bound: the oldest events go first
    a = sorted(client.nthreads())[0]
    client.register_plugin(peer.PeerExchange())
    limit = client.run(lambda: peer.TIMELINE_EVENTS, workers=[a])[a]
    try:
        client.run(_bounded_timeline, 3, workers=[a])
        tasks = tuple(((f"k{i}",), (np.add, Slot(0), i)) for i in range(5))
        spec = peer.PeerStage(StageSpec(tasks, (("k4",),)), "t12|0", (), (), 60.0)
        client.submit(peer.run_peer_stage, spec, 1, key="peer-bounded", workers=[a], pure=False).result(timeout=60)
        got = client.run(peer.take_timeline, workers=[a])[a]
        assert [(e[0], e[1]) for e in got] == [("task", "k3"), ("task", "k4"), ("stage", "t12|0")]
    finally:
        client.run(_bounded_timeline, limit, workers=[a])
        client.run(peer.record_timeline, False, workers=[a])


def test_same_host_sockets_carry_two_writers_messages_whole(tmp_path):
    # two writers' messages of mixed sizes arrive whole and bit for bit, and closing the
    # inbox removes its directory
    box = peer._Mailbox()
    inbox = peer._LocalInbox(box, str(tmp_path))
    links = [peer._LocalLink(inbox.path, 30.0) for _ in range(2)]
    try:  # a round's strips fit the socket whole (as much of the request as the kernel allows)
        with open("/proc/sys/net/core/wmem_max") as f:
            allowed = min(peer.SEND_BUFFER_BYTES, int(f.read()))
    except OSError:
        allowed = None
    if allowed is not None:
        assert all(link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= allowed for link in links)
    rng = np.random.default_rng(0)
    sent = {}
    for i in range(60):
        w = i % 2
        value = {"a": rng.standard_normal(int(rng.integers(1, 60_000))).astype(np.float32), "i": i}
        sent[(w, i)] = value
        links[w].send(*links[w].encode(f"c{w}|0", [(i, value)]))
    got = {}
    deadline = time.monotonic() + 60
    with box.cond:
        while len(got) < len(sent) and time.monotonic() < deadline:
            for w in (0, 1):
                got.update({(w, m): v for m, v in box.poll(f"c{w}|0", {i for (x, i) in sent if x == w}).items()})
            box.cond.wait(0.1)
    assert got.keys() == sent.keys()
    for k, v in sent.items():
        assert got[k]["i"] == v["i"] and np.array_equal(got[k]["a"], v["a"])
    for link in links:
        link.close()
    d = tmp_path / next(p.name for p in tmp_path.iterdir())
    inbox.close()
    assert not d.exists()


def test_results_are_the_same_over_sockets_and_comms(small_pbtio3, client):
    # a cluster whose peer messages all go over the workers' comms computes the same bits
    from distributed import Client

    from daskptycho.cluster import local_cluster

    ds = dp.open_dataset(small_pbtio3)
    kw = dict(engine="gd", tiles=(2, 2), slices=2, refine_probe=True, probe_refine_start=2)
    got = _run(ds, client, "peer", **kw)
    with dask.config.set({"daskptycho.schedule.same_host_sockets": False}):
        with local_cluster(2, memory_limit="2GiB") as cluster, Client(cluster) as c:
            ref = _run(ds, c, "peer", **kw)
            assert all(v is None for v in c.run(lambda dask_worker: dask_worker.plugins[peer.NAME].inbox).values())
    _same(got, ref)


def test_same_host_messages_carry_plain_values_bit_for_bit_and_nothing_else():
    # the same-host format: numeric arrays (any layout, 0-d), NumPy and Python scalars and
    # their containers come back equal, dtype for dtype; objects and object arrays are
    # refused (they go over the comm), so no message can carry code
    a = np.arange(24, dtype=np.complex64).reshape(4, 6) * (1 - 1j)
    value = {"strip": a[:, 1::2], "ill": np.linspace(0, 1, 5, dtype=np.float32), "idx": np.arange(3),
             "mask": np.array([True, False]), "zero-d": np.array(2.5), "empty": np.zeros((0, 3), np.float32),
             "s": np.float64(1 / 3), "n": np.int32(-7), "py": [1, 2.5, None, "x", float("nan"), 1 + 2j, (3, True)]}
    head, arrays = peer._LocalLink.encode("t|0", [(4, value)])
    bufs = [np.frombuffer(np.ascontiguousarray(x).tobytes(), np.uint8).copy() for x in arrays]
    import json

    channel, items = peer._decode(json.loads(head), bufs)
    assert channel == "t|0" and len(items) == 1 and items[0][0] == 4
    got = items[0][1]
    for k in ("strip", "ill", "idx", "mask", "zero-d", "empty"):
        assert got[k].dtype == value[k].dtype and got[k].shape == value[k].shape and np.array_equal(got[k], value[k]), k
    assert type(got["s"]) is np.float64 and got["s"] == value["s"] and type(got["n"]) is np.int32 and got["n"] == -7
    assert got["py"][:4] == [1, 2.5, None, "x"] and np.isnan(got["py"][4]) and got["py"][5] == 1 + 2j
    assert got["py"][6] == (3, True)
    got["strip"][0, 0] = 0  # the received arrays are the receiver's own, writable
    for bad in (object(), np.array([1, "a"], dtype=object), {"f": len}):
        with pytest.raises(peer._NotPlain):
            peer._LocalLink.encode("t|0", [(1, bad)])


def test_a_worker_directory_too_deep_for_a_socket_name_uses_the_temporary_directory(tmp_path):
    # a socket's name holds at most 108 bytes: a deep worker directory is passed over
    import tempfile

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    inbox = peer._LocalInbox(peer._Mailbox(), str(deep))
    try:
        assert os.path.dirname(inbox.dir) == tempfile.gettempdir() and len(inbox.path) < 108
        link = peer._LocalLink(inbox.path, 30.0)
        link.send(*link.encode("t|0", [(1, np.ones(3))]))
        with inbox.mailbox.cond:
            deadline = time.monotonic() + 30
            got = {}
            while not got and time.monotonic() < deadline:
                got = inbox.mailbox.poll("t|0", {1})
                inbox.mailbox.cond.wait(0.1)
        assert np.array_equal(got[1], np.ones(3))
        link.close()
    finally:
        inbox.close()
    assert not os.path.exists(inbox.dir)


def test_one_worker_runs_a_block_as_one_graph_and_says_where_its_blocks_end(small_pbtio3):
    # on one worker a peer block is one fused graph whose costs come back together: the
    # result says where each block ends (daskptycho.metrics.steady_span starts there)
    from distributed import Client

    from daskptycho.cluster import local_cluster

    ds = dp.open_dataset(small_pbtio3)
    with dask.config.set({"daskptycho.schedule.exchange": "peer", "daskptycho.schedule.block_iterations": 4}), \
            local_cluster(1, memory_limit="2GiB") as cluster, Client(cluster) as client:
        got = dp.reconstruct(ds, iterations=ITERATIONS, client=client, engine="gd", tiles=(2, 2), slices=2)
    assert json.loads(got.attrs["peer_block_ends"]) == [4, 6]
