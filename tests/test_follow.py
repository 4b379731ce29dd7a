"""Reconstructing while the scan is measured (:func:`daskptycho.follow`, ``reconstruct
--follow``): a simulated acquisition writes a growing store in another process or
thread, the reconstruction follows it in rounds over the frames committed so far and
ends as good as an offline run on the whole scan. A writer that stops, a reader that
starts before the first frame and a damaged chunk each end with a clear outcome. No
assertion depends on timing: rates only set how much happens during a round."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import daskptycho as dp
from daskptycho.errors import DatasetError, OptionsError
from daskptycho.io.stream import open_writer, replay, stream_state
from daskptycho.metrics import phase_correlation

SCAN = (16, 16)


def _simulation():
    return dp.simulate(kind="image", scan=SCAN, detector=32)


def _rounds(res):
    return json.loads(res.attrs["follow_rounds"])


def _no_frame_lost_or_repeated(res, n_frames):
    rounds = _rounds(res)
    used = [r["frames_used"] for r in rounds]
    assert used == sorted(used) and used[-1] == n_frames, used
    assert res.sizes["iteration"] == sum(r["iterations"] for r in rounds) == res.frames_used.size
    assert res["frames_used"].values[-1] == n_frames


def test_following_a_streamed_scan_matches_the_offline_run(tmp_path, client):
    path = tmp_path / "scan.zarr"
    writer = subprocess.Popen([sys.executable, "-m", "daskptycho", "simulate", str(path), "--kind", "image", "--scan",
                               f"{SCAN[0]}x{SCAN[1]}", "--detector", "32", "--stream", "80", "--chunk-frames", "16"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        res = dp.reconstruct(str(path), follow=True, iterations_after=20, round_iterations=2, client=client, timeout_s=120)
    finally:
        out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert res.attrs["scan_finished"] and not res.attrs["writer_stopped"]
    # the live page knows the frames acquired and in use
    from daskptycho.dashboard import live_state

    page = client.run_on_scheduler(lambda dask_scheduler: live_state(dask_scheduler).follow)
    assert page["acquired"] == page["used"] == SCAN[0] * SCAN[1] and page["scan_finished"]
    _no_frame_lost_or_repeated(res, SCAN[0] * SCAN[1])
    assert _rounds(res)[-1]["iterations"] == 20
    ds = dp.open_dataset(path)
    offline = dp.reconstruct(ds, iterations=20, client=client)
    got, _ = phase_correlation(res.object, ds.truth_object, ds.position.values)
    ref, _ = phase_correlation(offline.object, ds.truth_object, ds.position.values)
    assert got >= ref - 0.01, (got, ref)


def test_a_reader_started_before_the_first_frame_waits_for_it(tmp_path, client):
    path = tmp_path / "later.zarr"
    sim = _simulation()
    got = {}

    def run():
        got["res"] = dp.follow(str(path), engine="ml", iterations_after=3, round_iterations=2, client=client, timeout_s=120)

    reader = threading.Thread(target=run)
    reader.start()
    time.sleep(0.5)  # the reader polls a path where nothing is yet
    assert not stream_state(path).exists
    replay(sim, path, rate_hz=400, chunk_frames=32)
    reader.join(timeout=300)
    assert not reader.is_alive()
    _no_frame_lost_or_repeated(got["res"], SCAN[0] * SCAN[1])


def _stopped_writer(path, frames, chunk):
    """A store whose writer committed ``frames`` frames and stopped without finishing."""
    sim = _simulation()
    w = open_writer(path, like=sim, chunk_frames=chunk, n_frames=sim.sizes["scan"])
    w.append(sim.intensity.values[:frames], sim.position.values[:frames])
    w.flush()
    w.close()  # not finished: no more commits or heartbeats


def test_a_writer_that_stops_gives_the_result_so_far(tmp_path, client):
    path = tmp_path / "stopped.zarr"
    _stopped_writer(path, 96, 32)
    res = dp.follow(str(path), engine="ml", iterations_after=5, round_iterations=2, client=client, timeout_s=2)
    assert res.attrs["writer_stopped"] and not res.attrs["scan_finished"]
    assert res["frames_used"].values[-1] == 96
    assert np.all(np.isfinite(res.cost.values))


def test_a_damaged_committed_chunk_is_named(tmp_path, client):
    path = tmp_path / "damaged.zarr"
    _stopped_writer(path, 128, 64)
    chunk = sorted((path / "intensity" / "c").rglob("*"))
    victim = [p for p in chunk if p.is_file()][0]
    victim.write_bytes(victim.read_bytes()[:10])  # a truncated chunk file
    with pytest.raises(DatasetError, match="intensity"):
        dp.follow(str(path), engine="ml", iterations_after=2, round_iterations=1, client=client, timeout_s=2)


def test_follow_refuses_what_it_cannot_do(tmp_path):
    ds = _simulation()
    with pytest.raises(OptionsError, match="follow"):
        dp.reconstruct(ds, follow=True)
    with pytest.raises(OptionsError, match="resume"):
        dp.follow(tmp_path / "x.zarr", resume=True)
    with pytest.raises(OptionsError, match="round_iterations"):
        dp.follow(tmp_path / "x.zarr", round_iterations=0)
    r = subprocess.run([sys.executable, "-m", "daskptycho", "reconstruct", str(tmp_path / "x.zarr"), "--out", str(tmp_path / "r.zarr"),
                        "--iterations-after", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "--follow" in r.stderr


def test_start_continues_a_run_exactly(tmp_path, client):
    # the mechanism behind the rounds: a run started from an earlier result goes on as if
    # it had not stopped (ml and gd keep no state but the object and the probe)
    path = tmp_path / "s.zarr"
    dp.write_dataset(_simulation(), path)
    ds = dp.open_dataset(path)
    # (full batch: minibatches draw their order from the iteration number, which a started run counts afresh)
    for engine in ("ml", "gd"):
        whole = dp.reconstruct(ds, engine=engine, iterations=4, batch_size=None, client=client)
        first = dp.reconstruct(ds, engine=engine, iterations=2, batch_size=None, client=client)
        rest = dp.reconstruct(ds, engine=engine, iterations=2, batch_size=None, client=client, start=first)
        np.testing.assert_array_equal(rest.object.values, whole.object.values)
        np.testing.assert_array_equal(rest.cost.values, whole.cost.values[2:])
    with pytest.raises(OptionsError, match="start"):
        dp.reconstruct(ds, engine="ml", iterations=1, client=client, start=first, slices=2, slice_thickness_m=1e-6)


def test_the_command_line_follows_a_finished_store_in_one_round(tmp_path):
    # an ordinary (finished) store: one round of --iterations-after, the store's recommended margin as without --follow
    store, out = tmp_path / "fly.zarr", tmp_path / "r.zarr"
    dp.write_dataset(dp.simulate(kind="flyscan", scan=(6, 6), detector=16), store)
    r = subprocess.run([sys.executable, "-m", "daskptycho", "reconstruct", str(store), "--out", str(out), "--follow", "--engine", "ml",
                        "--iterations-after", "3", "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 rounds, 36 frames" in r.stdout and "the scan finished" in r.stdout
    res = dp.open_result(out)
    assert json.loads(res.attrs["options"])["pad_px"] == dp.open_dataset(store).attrs["recommended_pad_px"]
    assert res.sizes["iteration"] == 3 and bool(res.attrs["scan_finished"])
