"""Fused iterations (schedule/fuse.py): a few tasks per worker and stage, bit for bit the
tile graph's results."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from dask.local import get_sync

import daskptycho as dp
from daskptycho.engines import engine_options
from daskptycho.engines.gd import context_for, fuse_for, tiling_for
from daskptycho.engines.problem import prepare
from daskptycho.io.patterns import load_patterns
from daskptycho.schedule.fuse import Ref, fuse_by_worker, one_cost_task
from daskptycho.schedule.passes import gd_iteration
from daskptycho.tasks import tiles as tt


def _setup(tiles):
    ds = dp.simulate(kind="pbtio3", scan=(12, 12), detector=32, slices=2, max_angle_rad=60e-3, defocus_m=60e-10)
    p = prepare(ds, engine_options(engine="gd", slices=2, tiles=tiles, refine_probe=True))
    tiling = tiling_for(p)
    pats = load_patterns(ds)
    return p, tiling, context_for(p, tiling), {t.key: pats[t.positions] for t in tiling}


def _run(g, wanted):
    return dict(zip(wanted, get_sync(g.tasks, wanted)))


@pytest.mark.parametrize("n_workers", [1, 2, 3, 9])
def test_fused_iterations_give_the_tile_graphs_results(n_workers):
    p, tiling, ctx, data = _setup((3, 3))
    keys = [t.key for t in tiling]
    place = {k: f"w{i * n_workers // len(keys)}" for i, k in enumerate(keys)}
    ref = fused_states = {t.key: tt.initial_patch(2, t.extended) for t in tiling}
    probe_r = probe_f = p.probe
    for it in range(3):
        g = gd_iteration(tiling, it, ref, data, probe_r, ctx, refine_probe=True, local_updates=it == 2, tag="t")
        wanted = [*g.outputs["states"].values(), g.outputs["costs"][0], g.outputs["probe"]]
        out = _run(g, wanted)
        g2 = gd_iteration(tiling, it, fused_states, data, probe_f, ctx, refine_probe=True, local_updates=it == 2, tag="t")
        fused, where = fuse_by_worker(g2, it, place, wanted, external=lambda x: False)
        assert all(k[0] in ("stage", "pick", "cost", "probe", "probe-sum") for k in fused.tasks)
        need = list(dict.fromkeys(w.source if isinstance(w, Ref) else w for w in where.values()))
        vals = _run(fused, need)

        def value(k, where=where, vals=vals):
            w = where[k]
            return vals[w.source][w.name] if isinstance(w, Ref) else vals[w]

        for k in g.outputs["states"].values():
            np.testing.assert_array_equal(value(k), out[k])
        assert value(g.outputs["costs"][0]) == out[g.outputs["costs"][0]]
        np.testing.assert_array_equal(value(g.outputs["probe"]), out[g.outputs["probe"]])
        ref = {t: out[k] for t, k in g.outputs["states"].items()}
        fused_states = {t: value(k) for t, k in g2.outputs["states"].items()}
        probe_r, probe_f = out[g.outputs["probe"]], value(g2.outputs["probe"])


def test_fused_task_count_grows_with_workers_not_tiles():
    counts = {}
    for tiles in [(2, 2), (4, 4), (6, 6)]:
        p, tiling, ctx, data = _setup(tiles)
        keys = [t.key for t in tiling]
        place = {k: f"w{i * 2 // len(keys)}" for i, k in enumerate(keys)}
        states = {t.key: None for t in tiling}
        g = gd_iteration(tiling, 0, states, data, p.probe, ctx, refine_probe=True, tag="t")
        wanted = [*g.outputs["states"].values(), g.outputs["costs"][0], g.outputs["probe"]]
        fused, _ = fuse_by_worker(g, 0, place, wanted, external=lambda x: False)
        counts[tiles] = (len(g.tasks), len(fused.tasks))
    assert counts[(6, 6)][0] > 8 * counts[(2, 2)][0]  # the tile graph grows with the tiles
    assert counts[(6, 6)][1] <= counts[(2, 2)][1] + 6  # the fused one stays a few tasks per worker
    assert counts[(6, 6)][1] < 20, counts


def test_peer_stages_are_one_per_worker_and_block():
    # peer exchange: a block of iterations without reductions between them is one stage per
    # worker, one message per worker (its tiles' costs) and one cost per iteration, whatever the tiles
    from daskptycho.schedule.graph import IterationGraph
    from daskptycho.tasks.peer import PeerStage, Receive

    for tiles, n_workers in [((2, 2), 2), ((6, 6), 2), ((6, 6), 3)]:
        p, tiling, ctx, data = _setup(tiles)
        keys = [t.key for t in tiling]
        place = {k: f"w{i * n_workers // len(keys)}" for i, k in enumerate(keys)}
        g, states, costs = IterationGraph(tag="t"), {t.key: None for t in tiling}, []
        for it in range(4):
            gi = gd_iteration(tiling, it, states, data, p.probe, ctx, tag="t")
            g.tasks.update(gi.tasks)
            g.placement.update(gi.placement)
            states, costs = gi.outputs["states"], costs + gi.outputs["costs"]
        fused, where = fuse_by_worker(g, 0, place, [*states.values(), *costs], external=lambda x: False, channel="t|0")
        kinds = sorted(k[0] for k in fused.tasks)
        assert kinds.count("stage") == n_workers and kinds.count("pick") == n_workers and kinds.count("cost") == 4, kinds
        # the block's four costs become one unpinned task; each iteration's cost is its place in it
        per_it = [[c] for c in costs]
        places = one_cost_task(fused, where, per_it, 0)
        kinds = sorted(k[0] for k in fused.tasks)
        assert kinds.count("costs") == 1 and "cost" not in kinds, kinds
        (key,) = [k for k in fused.tasks if k[0] == "costs"]
        assert key not in fused.placement and where[key] == key and not any(c in where for c in costs)
        assert places == [[(key, i)] for i in range(4)]
        # every message a stage waits for is sent to its worker by another worker's stage
        sent, waited = set(), set()
        for k, task in fused.tasks.items():
            if k[0] == "stage":
                spec = task[1]
                assert isinstance(spec, PeerStage)
                w = place[fused.placement[k]]
                sent |= {(a, m) for _, m, to in spec.sends for a in to if a != w}

                def walk(x, w=w, waited=waited):
                    if isinstance(x, Receive):
                        waited.add((w, x.msg))
                    elif isinstance(x, (tuple, list)):
                        for y in x:
                            walk(y, w, waited)
                walk([t for _, t in spec.stage.tasks])
        assert waited and waited == sent


def test_fuse_setting():
    two = {(0, 0): "a", (0, 1): "b"}
    many = {(0, c): "a" for c in range(4)}
    assert not fuse_for(two) and fuse_for(many)
    with dask.config.set({"daskptycho.schedule.fuse": "always"}):
        assert fuse_for(two)
    with dask.config.set({"daskptycho.schedule.fuse": "never"}):
        assert not fuse_for(many)
    with dask.config.set({"daskptycho.schedule.fuse": "sometimes"}), pytest.raises(dp.OptionsError, match="schedule.fuse"):
        fuse_for(two)


def test_fused_runs_equal_tile_graph_runs(small_pbtio3, client, tmp_path):
    ds = dp.open_dataset(small_pbtio3)
    # minibatch rounds in every iteration: the resumed run below extends the total
    kw = dict(engine="gd", tiles=(3, 3), iterations=5, slices=2, refine_probe=True, probe_refine_start=2, minibatch_fraction=1.0,
              client=client)
    out = {}
    for mode in ("never", "always"):
        with dask.config.set({"daskptycho.schedule.fuse": mode, "daskptycho.schedule.exchange": "scheduler"}):
            out[mode] = dp.reconstruct(ds, checkpoint=str(tmp_path / f"{mode}.zarr"), checkpoint_every=2, **kw)
    for v in ("object", "probe", "cost"):
        np.testing.assert_array_equal(out["always"][v].values, out["never"][v].values)
    with dask.config.set({"daskptycho.schedule.fuse": "always", "daskptycho.schedule.exchange": "scheduler"}):
        hve = dp.reconstruct(ds, engine="hve", tiles=(2, 2), iterations=3, slices=2, client=client)
        more = dp.reconstruct(ds, checkpoint=str(tmp_path / "always.zarr"), resume=True, **dict(kw, iterations=7))
    with dask.config.set({"daskptycho.schedule.fuse": "never", "daskptycho.schedule.exchange": "scheduler"}):
        hve_ref = dp.reconstruct(ds, engine="hve", tiles=(2, 2), iterations=3, slices=2, client=client)
        more_ref = dp.reconstruct(ds, **dict(kw, iterations=7))
    np.testing.assert_array_equal(hve.object.values, hve_ref.object.values)
    np.testing.assert_array_equal(more.object.values, more_ref.object.values)


def test_fused_runs_move_what_the_tile_graph_moves(small_pbtio3, client):
    # the messages between workers carry the strips, costs and probe parts the tile graph's
    # exchanges carry, bundled: no stage's other values travel
    ds = dp.open_dataset(small_pbtio3)

    def moved(mode):
        client.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())
        with dask.config.set({"daskptycho.schedule.fuse": mode, "daskptycho.schedule.exchange": "scheduler"}):
            dp.reconstruct(ds, engine="gd", tiles=(3, 3), iterations=3, slices=2, refine_probe=True, client=client)
        logs = client.run(lambda dask_worker: [dict(e["keys"]) for e in dask_worker.transfer_incoming_log])
        return {k: n for entries in logs.values() for e in entries for k, n in e.items()}

    tile, fused = moved("never"), moved("always")
    kinds = {k[0] for k in fused if isinstance(k, tuple)}
    assert kinds <= {"pick", "cost", "probe", "probe-sum"}, kinds
    assert "pick" in kinds
    total = lambda m: sum(n for k, n in m.items() if isinstance(k, tuple))  # noqa: E731
    assert total(fused) <= 1.1 * total(tile), (total(fused), total(tile))


def test_a_rebound_block_is_the_block_built_anew():
    # a later block made by rebinding the first one's fused graph has the keys, placement and
    # dependencies that building and fusing it would give, its own channel and inputs, and
    # its stages share the first block's bodies (nothing per tile is made again)
    import pickle

    from dask.core import get_dependencies

    from daskptycho.schedule.fuse import Input, Ref, item, rebind, stage_bodies
    from daskptycho.schedule.graph import IterationGraph
    from daskptycho.tasks.peer import PeerStage, run_peer_block

    p, tiling, ctx, data = _setup((3, 3))
    keys = [t.key for t in tiling]
    place = {k: f"w{i * 2 // len(keys)}" for i, k in enumerate(keys)}

    def block(start, n=3, refine=(False, True, True)):
        g, states, probe, costs = IterationGraph(tag="t"), {k: Input(("state", k)) for k in keys}, Input("probe"), []
        for it, r in zip(range(start, start + n), refine):
            gi = gd_iteration(tiling, it, states, data, probe, ctx, refine_probe=r, tag="t")
            g.tasks.update(gi.tasks)
            g.placement.update(gi.placement)
            states, probe, costs = gi.outputs["states"], gi.outputs["probe"], costs + gi.outputs["costs"]
        wanted = [*states.values(), *costs, probe]
        return fuse_by_worker(g, start, place, wanted, external=lambda x: isinstance(x, Input), channel=f"t|{start}")

    first, first_where = block(0)
    direct, direct_where = block(6)
    inputs = {("state", k): Ref(("stage", 5, 0, 0, "t"), ("update", 5, *k, "t"), k) for k in keys}
    inputs["probe"] = ("probe", 5, "t")
    bound, where = rebind(first, first_where, 6, inputs, "t|6")
    assert set(bound.tasks) == set(direct.tasks) and bound.placement == direct.placement
    deps = {k: set(get_dependencies(bound.tasks, k)) for k in bound.tasks}
    assert deps == {k: set(get_dependencies(direct.tasks, k)) for k in direct.tasks}
    # the inputs: each tile's state read from the previous block's result by its worker's stage
    read = {(x[1], x[2]) for k, t in bound.tasks.items() if k[0] == "stage" for x in t[2:] if isinstance(x, tuple) and x[0] is item}
    assert read == {(r.source, r.name) for k, r in inputs.items() if k != "probe"}
    assert any(_contains(t, ("probe", 5, "t")) for t in bound.tasks.values())
    assert not any(isinstance(x, Input) for t in bound.tasks.values() for x in _flat(t))
    for k, t in bound.tasks.items():
        if k[0] == "stage":
            spec, old = t[1], first.tasks[(k[0], k[1] - 6, *k[2:])][1]
            assert isinstance(spec, PeerStage) and spec.channel == "t|6" and spec.stage is old.stage
    # with the stages' bodies kept on the workers, a block carries only their inputs
    bodies = stage_bodies(first)
    assert sorted(k[1:] for k in bodies.tasks) == sorted(k[1:] for k in first.tasks if k[0] == "stage")
    assert all(bodies.placement[k] == first.placement[("stage", *k[1:])] for k in bodies.tasks)
    held = {("stage", *k[1:]): f"held-{i}" for i, k in enumerate(bodies.tasks)}
    light, _ = rebind(first, first_where, 6, inputs, "t|6", bodies=held)
    for k, t in light.tasks.items():
        if k[0] == "stage":
            assert t[0] is run_peer_block and t[1] == held[(k[0], k[1] - 6, *k[2:])] and t[2] == "t|6"
            assert t[3:] == bound.tasks[k][2:]
    assert len(pickle.dumps(light.tasks)) * 5 < len(pickle.dumps(bound.tasks))
    # results: the rebound block's keys, the values named as in the first block's stages
    assert {(r.source if isinstance(r, Ref) else r) for r in where.values()} == \
        {(r.source if isinstance(r, Ref) else r) for r in direct_where.values()}


def _flat(x):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flat(y)
    else:
        yield x


def _contains(x, key):
    if isinstance(x, tuple) and x == key:
        return True
    return isinstance(x, (tuple, list)) and any(_contains(y, key) for y in x)


@pytest.mark.parametrize("engine, cfg", [
    ("gd", {}),
    ("hve", {}),
    ("gd", {"daskptycho.schedule.exchange": "scheduler", "daskptycho.schedule.fuse": "always"}),
], ids=["gd-peer", "hve-peer", "gd-fused"])
def test_a_finished_run_leaves_nothing_on_the_workers_without_a_garbage_collection(small_pbtio3, client, engine, cfg):
    # the block graphs are made and rebound without reference cycles, so a run's patterns
    # and tile states leave the workers as it returns, not at Python's next cyclic
    # collection (which a notebook's long-lived cluster may wait a long time for)
    import gc
    import time

    gc.collect()
    gc.disable()
    try:
        with dask.config.set(cfg):
            dp.reconstruct(str(small_pbtio3), engine=engine, tiles=(2, 2), iterations=4, slices=2, client=client)
        held = None
        for _ in range(100):  # the releases reach the workers within moments
            held = client.run(lambda dask_worker: sorted(map(str, dask_worker.data)))
            if not any(held.values()):
                break
            time.sleep(0.1)
        assert not any(held.values()), held
    finally:
        gc.enable()
