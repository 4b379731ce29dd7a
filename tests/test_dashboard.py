"""The live state behind ``/daskptycho``: preview images, the scheduler-side store, the page."""

from __future__ import annotations

import urllib.request

import dask
import numpy as np
import pytest

import daskptycho as dp
from daskptycho import dashboard


def test_tile_previews_fit_together_into_the_subsampled_phase():
    rng = np.random.default_rng(1)
    obj = np.exp(1j * rng.uniform(-1, 1, (2, 37, 50))).astype(np.complex64)
    truth = np.angle(obj).sum(axis=0)
    stride = 3
    # uneven cores with halos around them, as the tiles hold them
    ys, xs = [0, 11, 25, 37], [0, 17, 50]
    pieces = {}
    for r in range(3):
        for c in range(2):
            y0, y1, x0, x1 = ys[r], ys[r + 1], xs[c], xs[c + 1]
            ey0, ex0 = max(0, y0 - 4), max(0, x0 - 5)
            state = obj[:, ey0:min(37, y1 + 4), ex0:min(50, x1 + 5)]
            region = (slice(y0 - ey0, y1 - ey0), slice(x0 - ex0, x1 - ex0))
            pieces[(r, c)] = dashboard.phase_preview(state, region, (y0, x0), stride)
    out = dashboard.stitch_preview(pieces, stride, (37, 50))
    assert out["stride"] == 3 and out["image"].dtype == np.float32
    np.testing.assert_allclose(out["image"], truth[::3, ::3], atol=1e-5)


def test_whole_object_preview_chooses_its_stride_and_picks_modes():
    obj = np.ones((2, 100, 60), np.complex64)
    obj[0] *= np.exp(0.5j)
    obj[1] *= np.exp(-2.0j)  # a weak mode's phase must not leak into the picture of mode 0
    piece = dashboard.phase_preview(obj, (slice(0, 1), slice(None), slice(None)), size=32)
    out = dashboard.stitch_preview({(0, 0): piece}, None, None)
    assert out["stride"] == 4 and out["image"].shape == (25, 15)
    np.testing.assert_allclose(out["image"], 0.5, atol=1e-6)
    ml_state = {"object": obj, "probe": None}
    both = dashboard.phase_preview(ml_state, (slice(None), slice(None)), size=200)
    np.testing.assert_allclose(both[1], -1.5, atol=1e-6)  # slices: phases add


def test_live_state_counts_a_tile_done_after_its_last_round():
    live = dashboard.LiveState()
    live.reset("gd", 5, (2, 2), rounds=2)
    v = live.version
    live.transition(("update", 0, 0, 1), "processing", "memory", stimulus_id="x")  # round 0 of iteration 0
    assert live.tile_done == {}
    live.transition(("update", 1, 0, 1), "processing", "memory", stimulus_id="x")  # round 1: iteration 0 done
    live.transition(("update", 3, 1, 1, "r1"), "processing", "memory", stimulus_id="x")  # after a recovery
    live.transition(("update", 5, 1, 0), "processing", "erred", stimulus_id="x")
    live.transition(("grad", 5, 1, 0), "processing", "memory", stimulus_id="x")
    live.transition(("ml-iteration", 4, "run-1"), "processing", "memory", stimulus_id="x")  # the ml engine's key
    assert live.tile_done == {(0, 1): 0, (1, 1): 1, (0, 0): 4}
    assert live.version > v
    live.update({"engine": "gd", "iteration": 0, "cost": 2.5, "image": np.zeros((3, 4)), "stride": 2})
    assert live.costs == [(0, 2.5)] and live.image.shape == (3, 4) and live.stride == 2


@pytest.fixture(scope="module")
def gd_run(client, small_pbtio3):
    with dask.config.set({"daskptycho.dashboard.preview_px": 16}):
        res = dp.reconstruct(str(small_pbtio3), engine="gd", tiles=(2, 2), iterations=3, slices=2, client=client)
    return res


def _live(dask_scheduler):
    p = dask_scheduler.plugins[dashboard.PLUGIN_NAME]
    return {"engine": p.engine, "iteration": p.iteration, "iterations": p.iterations, "costs": p.costs, "image": p.image,
            "stride": p.stride, "tiles": p.tiles, "tile_done": p.tile_done}


def test_a_run_publishes_its_costs_tiles_and_a_small_phase_image(client, gd_run):
    live = client.run_on_scheduler(_live)
    assert live["engine"] == "gd" and live["iteration"] == 2 and live["iterations"] == 3
    np.testing.assert_allclose([c for _, c in live["costs"]], gd_run.cost.values, rtol=1e-12)
    assert [i for i, _ in live["costs"]] == [0, 1, 2]
    assert live["tiles"] == (2, 2) and live["tile_done"] == {(r, c): 2 for r in range(2) for c in range(2)}
    obj = gd_run.object.values
    stride = live["stride"]
    assert stride == -(-max(obj.shape[1:]) // 16)
    # the last image is the phase of the final object (the same tile states) on the stride grid
    truth = np.angle(obj).sum(axis=0)[::stride, ::stride]
    assert live["image"].shape == truth.shape and max(truth.shape) <= 16
    np.testing.assert_allclose(live["image"], truth, atol=1e-4)


def test_the_dashboard_serves_the_page_and_its_document_reads_the_store(client, gd_run):
    from bokeh.document import Document

    from daskptycho.engines.driver import Driver
    from daskptycho.engines.live import LiveView

    url = client.dashboard_link.replace("/status", "/daskptycho")
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        html = r.read().decode()
    assert "bokeh" in html.lower()
    # the app's document, built against the real scheduler (in this process), holds the run
    doc = Document()
    dashboard.daskptycho_doc(client.cluster.scheduler, {}, doc)
    costs = doc.get_model_by_name("cost-source").data["cost"]
    np.testing.assert_allclose(costs, gd_run.cost.values, rtol=1e-12)
    image = doc.get_model_by_name("phase-source").data["image"][0]
    assert image.ndim == 2 and np.isfinite(image).all()
    tiles = doc.get_model_by_name("tile-source").data
    assert sorted(tiles["done"]) == [2, 2, 2, 2]
    assert "engine <b>gd</b>, iteration 3 of 3 done" in doc.get_model_by_name("title").text
    # what a run says its page is (this resets the store: last)
    with Driver(client) as drv:
        live = LiveView(drv)
        assert live.begin("gd", 3, (2, 2)) == url == live.page
    assert client.run_on_scheduler(_live)["costs"] == []


@pytest.mark.parametrize("every, exchange, wanted", [(0, "scheduler", [0, 1, 2, 3]), (1e6, "scheduler", [0, 3]),
                                                     (0, "peer", [1, 2, 3]), (1e6, "peer", [1, 3])])
def test_phase_images_are_cut_at_most_every_preview_every_s(client, small_pbtio3, every, exchange, wanted):
    """Every iteration's cost is published; an image (a task per tile) only every
    preview_every_s seconds, and always for the first and the last iteration. Peer blocks
    hand out their last iteration's states: images are cut there (blocks of up to 2 here,
    cut where the 3 minibatch iterations end: 0-1, 2, 3)."""
    from distributed import get_task_stream

    cfg = {"daskptycho.dashboard.preview_every_s": every, "daskptycho.schedule.exchange": exchange,
           "daskptycho.schedule.block_iterations": 2}
    with dask.config.set(cfg), get_task_stream(client) as ts:
        res = dp.reconstruct(str(small_pbtio3), engine="gd", tiles=(2, 2), iterations=4, slices=2, client=client)
    previews = [r["key"] for r in ts.data if isinstance(r["key"], tuple) and r["key"][0] == "preview"]
    assert sorted({k[1] for k in previews}) == wanted
    assert len(previews) == 4 * len(wanted)                        # one per tile
    live = client.run_on_scheduler(_live)
    assert [i for i, _ in live["costs"]] == [0, 1, 2, 3]
    np.testing.assert_allclose([c for _, c in live["costs"]], res.cost.values, rtol=1e-12)
    # the image on the page is the final object's (the last iteration always gets one)
    stride = live["stride"]
    truth = np.angle(res.object.values).sum(axis=0)[::stride, ::stride]
    assert live["image"].shape == truth.shape
    np.testing.assert_allclose(live["image"], truth, atol=1e-4)
    with dask.config.set({"daskptycho.dashboard.preview_every_s": "soon"}), pytest.raises(dp.OptionsError, match="preview_every_s.*'soon'"):
        dashboard.preview_every_s()


def test_live_publishing_can_be_switched_off(client, small_pbtio3):
    before = client.run_on_scheduler(_live)
    with dask.config.set({"daskptycho.dashboard.live": False}):
        res = dp.reconstruct(str(small_pbtio3), engine="ml", iterations=1, slices=2, client=client)
    assert res.cost.size == 1
    after = client.run_on_scheduler(_live)
    assert after["costs"] == before["costs"] and after["engine"] == before["engine"]


def test_a_scheduler_started_before_the_import_gets_the_page_when_a_run_begins():
    import urllib.error

    from distributed import Client, LocalCluster
    from distributed.dashboard.scheduler import applications

    doc = applications.pop(dashboard.ROUTE)  # as if daskptycho had not been imported yet
    try:
        with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address="127.0.0.1:0") as cl, \
                Client(cl) as c:
            url = c.dashboard_link.replace("/status", "/daskptycho")
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(url, timeout=30)
            assert c.run_on_scheduler(dashboard.begin_run, engine="gd", iterations=1, tiles=[1, 1])
            with urllib.request.urlopen(url, timeout=30) as r:
                assert r.status == 200 and "bokeh" in r.read().decode().lower()
            assert c.run_on_scheduler(dashboard.begin_run, engine="gd", iterations=1, tiles=[1, 1])  # once only
    finally:
        applications[dashboard.ROUTE] = doc


def test_a_peer_blocks_iterations_reach_the_page_in_one_call(client, small_pbtio3, monkeypatch):
    # the costs of a block arrive together: the driver holds their messages until it would
    # wait, then sends them in one call, in order (not a scheduler round trip each)
    from daskptycho.engines.live import LiveView

    calls = []
    flush = LiveView.flush

    def counting(self):
        calls.append(len(self._held))
        return flush(self)

    monkeypatch.setattr(LiveView, "flush", counting)
    cfg = {"daskptycho.schedule.exchange": "peer", "daskptycho.schedule.block_iterations": 4,
           "daskptycho.dashboard.preview_every_s": 1e6}
    with dask.config.set(cfg):
        res = dp.reconstruct(str(small_pbtio3), engine="gd", tiles=(2, 2), iterations=8, slices=2, batch_size=None,
                             client=client)
    live = client.run_on_scheduler(_live)
    assert [i for i, _ in live["costs"]] == list(range(8))
    np.testing.assert_allclose([c for _, c in live["costs"]], res.cost.values, rtol=1e-12)
    sent = [n for n in calls if n]
    assert sum(sent) == 8 and len(sent) < 8 and max(sent) >= 4, calls
