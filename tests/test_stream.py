"""Growing dataset stores: the writer's whole-chunk commits, readers that see only committed
frames (while a writer runs, after it is killed, on damaged chunks), and the simulated
acquisition ``daskptycho simulate --stream``. No timing assertion: readers poll with
generous timeouts."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import zarr

import daskptycho as dp
from daskptycho.errors import DatasetError, OptionsError, OutputExistsError, StreamStalledError
from daskptycho.io import stream

SIM = {"kind": "pbtio3", "scan": (4, 6), "detector": 16, "slices": 1}
STATIC_ATTRS_IGNORED = {"stream", "source"}
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def sim():
    return dp.simulate(**SIM)


def _meta(ds):
    """open_writer's keywords for the geometry, static variables and attributes of ``ds``."""
    grid = types.SimpleNamespace(y=ds["y"].values, x=ds["x"].values)
    attrs = {k: v for k, v in ds.attrs.items() if k not in ("radiation", "energy_eV", "wavelength_m", "pixel_size_m", "slice_thickness_m")}
    return {"window": (ds.sizes["ky"], ds.sizes["kx"]), "pixel_size_m": ds.attrs["pixel_size_m"], "radiation": ds.attrs["radiation"],
            "energy_eV": ds.attrs["energy_eV"], "wavelength_m": ds.attrs["wavelength_m"], "slice_thickness_m": ds.attrs["slice_thickness_m"],
            "truth_object": ds["truth_object"].values, "truth_probe": ds["truth_probe"].values, "truth_grid": grid, "attrs": attrs}


def _arrays(path):
    return {n: json.loads((path / n / "zarr.json").read_text()) for n in sorted(os.listdir(path)) if (path / n / "zarr.json").is_file()}


def _assert_same_store(got_path, expect_path):
    """Two stores hold the same arrays (metadata and values) and attributes, bar the stream's record."""
    assert _arrays(got_path) == _arrays(expect_path)
    got, expect = dp.open_dataset(got_path), dp.open_dataset(expect_path)
    assert set(got.variables) == set(expect.variables)
    for name in expect.variables:
        assert got[name].dims == expect[name].dims, name
        assert got[name].dtype == expect[name].dtype, name
        if got[name].dtype.kind not in "OUT":
            np.testing.assert_array_equal(got[name].values, expect[name].values, err_msg=name)
    assert got["intensity"].data.chunks == expect["intensity"].data.chunks
    strip = lambda a: {k: v for k, v in a.items() if k not in STATIC_ATTRS_IGNORED}  # noqa: E731
    assert strip(got.attrs) == strip(expect.attrs)
    assert got.attrs["stream"]["scan_finished"] is True and got.attrs["stream"]["frames_complete"] == got.sizes["scan"]


def _simulate_cli(out, rate, chunk, scan="4x4"):
    args = [sys.executable, "-m", "daskptycho", "simulate", str(out), "--kind", "pbtio3", "--scan", scan, "--detector", "16",
            "--slices", "1", "--stream", str(rate), "--chunk-frames", str(chunk)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------- writer


def test_appending_in_chunks_then_finishing_gives_the_store_write_dataset_writes(sim, tmp_path):
    ref = tmp_path / "ref.zarr"
    dp.write_dataset(sim, ref, scan_chunk=4)
    path = tmp_path / "s.zarr"
    inten, pos = sim["intensity"].values, sim["position"].values
    with dp.open_writer(path, chunk_frames=4, n_frames=24, **_meta(sim)) as w:
        assert stream.stream_state(path).frames_complete == 0
        done = 0
        for n in (1, 5, 3, 7, 2, 5):  # 23 frames: whole chunks commit as they fill
            w.append(inten[done:done + n], pos[done:done + n])
            done += n
            st = stream.stream_state(path)
            assert st.frames_complete == done // 4 * 4 == w.frames_complete and not st.scan_finished
        w.append(inten[23], pos[23])  # one frame as (N, N) and (2,)
    assert not (path / stream.LOCK_NAME).exists()
    _assert_same_store(path, ref)
    st = stream.stream_state(path)
    assert (st.frames_complete, st.scan_finished, st.n_frames_expected, st.chunk_frames) == (24, True, 24, 4)

    # a partial last chunk, and the store built from a dataset (like=): still write_dataset's store
    ref2, path2 = tmp_path / "ref2.zarr", tmp_path / "s2.zarr"
    dp.write_dataset(sim, ref2, scan_chunk=5)
    stream.replay(sim, path2, 1e6, chunk_frames=5)
    _assert_same_store(path2, ref2)
    assert sorted(os.listdir(path2 / "intensity" / "c")) == ["0", "1", "2", "3", "4"]


def test_an_exception_leaves_the_store_unfinished_and_resume_completes_it(sim, tmp_path):
    path = tmp_path / "s.zarr"
    inten, pos = sim["intensity"].values, sim["position"].values
    with pytest.raises(RuntimeError, match="beam lost"):
        with dp.open_writer(path, like=sim, chunk_frames=4) as w:
            w.append(inten[:10], pos[:10])
            raise RuntimeError("beam lost")
    st = stream.stream_state(path)
    assert (st.frames_complete, st.scan_finished) == (8, False)  # frames 8, 9 were buffered, never committed
    with pytest.raises(DatasetError) as e:
        dp.open_dataset(path)
    assert e.value.field == "attrs.stream" and "open_frames" in str(e.value) and "open_writer" in str(e.value)
    view = stream.open_frames(path)
    np.testing.assert_array_equal(view["intensity"].values, inten[:8])
    np.testing.assert_array_equal(view["position"].values, pos[:8])
    # the lazy patterns travel to workers: the graph pickles, without an open Zarr array
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(view["intensity"].data)).compute(), inten[:8])

    w = dp.open_writer(path, resume=True, window=(16, 16), pixel_size_m=sim.attrs["pixel_size_m"])
    assert w.frames_complete == 8
    w.append(inten[8:], pos[8:])
    w.finish()
    ref = tmp_path / "ref.zarr"
    dp.write_dataset(sim, ref, scan_chunk=4)
    _assert_same_store(path, ref)


def test_input_arrays_are_copied_and_never_modified(sim, tmp_path):
    inten = sim["intensity"].values[:3].astype(np.float64)
    pos = sim["position"].values[:3].copy()
    keep_i, keep_p = inten.copy(), pos.copy()
    w = dp.open_writer(tmp_path / "s.zarr", like=sim, chunk_frames=4)
    w.append(inten, pos)
    np.testing.assert_array_equal(inten, keep_i)
    np.testing.assert_array_equal(pos, keep_p)
    inten[:] = 7.0  # the caller reuses its buffer before the chunk is written
    w.append(keep_i[:1], keep_p[:1])
    w.close()
    np.testing.assert_array_equal(stream.open_frames(tmp_path / "s.zarr")["intensity"].values, np.concatenate([keep_i, keep_i[:1]]).astype(np.float32))


# --------------------------------------------------------------------------- readers while a writer runs


def test_a_reader_follows_a_streaming_subprocess_and_sees_only_whole_chunks(tmp_path):
    path = tmp_path / "live.zarr"
    # a reader started before the acquisition: no store yet is a state, not an error
    st = stream.stream_state(path)
    assert (st.exists, st.frames_complete, st.scan_finished) == (False, 0, False)
    proc = _simulate_cli(path, rate=4, chunk=4)  # 16 frames, a commit about every second
    try:
        seen, views = [], []
        st = stream.wait_for_frames(path, 0, timeout_s=TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while not st.scan_finished:
            assert time.monotonic() < deadline, "the writer did not finish"
            seen.append(st)
            if st.frames_complete:
                v = stream.open_frames(path, 0, st.frames_complete)
                views.append((st.frames_complete, v["intensity"].values, v["position"].values, v["scan"].values))
            time.sleep(0.02)
            st = stream.stream_state(path)
        seen.append(st)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "streaming 16 patterns" in out and "in chunks of 4" in out
    counts = [s.frames_complete for s in seen]
    assert counts == sorted(counts), counts  # never goes back
    assert all(c % 4 == 0 for c in counts[:-1]) and counts[-1] == 16
    assert any(0 < c < 16 for c in counts), counts  # the store was read while it grew
    final = dp.open_dataset(path)
    truth = dp.simulate(**{**SIM, "scan": (4, 4)})
    np.testing.assert_array_equal(final["intensity"].values, truth["intensity"].values)
    for n, inten, pos, scan in views:  # no torn chunk, no position without its pattern
        assert inten.shape[0] == pos.shape[0] == n
        np.testing.assert_array_equal(inten, final["intensity"].values[:n])
        np.testing.assert_array_equal(pos, final["position"].values[:n])
        np.testing.assert_array_equal(scan, np.arange(n))


def test_a_killed_writer_leaves_its_committed_frames_readable(tmp_path):
    path = tmp_path / "killed.zarr"
    proc = _simulate_cli(path, rate=8, chunk=4, scan="8x8")  # 8 s of frames; killed after the first chunks
    try:
        stream.wait_for_frames(path, 8, timeout_s=TIMEOUT_S)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT_S)  # reaps it and closes its pipes
    assert proc.returncode == -signal.SIGKILL
    st = stream.stream_state(path)
    n = st.frames_complete
    assert 8 <= n < 64 and n % 4 == 0 and not st.scan_finished
    time.sleep(1.5)  # longer than the writer's heartbeat interval: nobody writes any more
    assert stream.stream_state(path) == st
    with pytest.raises(StreamStalledError) as e:
        stream.wait_for_frames(path, n + 1, timeout_s=0.5, poll_s=0.05)
    assert e.value.state.frames_complete == n and "resume=True" in str(e.value)
    truth = dp.simulate(**{**SIM, "scan": (8, 8)})
    view = stream.open_frames(path)
    np.testing.assert_array_equal(view["intensity"].values, truth["intensity"].values[:n])
    np.testing.assert_array_equal(view["position"].values, truth["position"].values[:n])

    # what a writer killed mid-chunk leaves: arrays already grown, a torn chunk file beyond
    # frames_complete; it is never read, and the state does not move
    for name in ("intensity", "position", "scan"):
        a = zarr.open_array(path / name, mode="r+")
        a.resize((n + 4,) + a.shape[1:])
    torn = path / "intensity" / "c" / str(n // 4) / "0" / "0"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"\x28\xb5\x2f\xfd garbage")
    assert stream.stream_state(path) == st
    view = stream.open_frames(path)
    assert view.sizes["scan"] == n
    np.testing.assert_array_equal(view["intensity"].values, truth["intensity"].values[:n])
    with pytest.raises(DatasetError):
        dp.open_dataset(path)

    # resuming drops what lies beyond the committed frames and continues from there
    with dp.open_writer(path, resume=True) as w:
        assert w.frames_complete == n
        w.append(truth["intensity"].values[n:], truth["position"].values[n:])
    ref = tmp_path / "ref.zarr"
    dp.write_dataset(truth, ref, scan_chunk=4)
    _assert_same_store(path, ref)


def test_a_reader_before_the_first_frame(sim, tmp_path, capsys):
    path = tmp_path / "early.zarr"
    with pytest.raises(StreamStalledError, match="has not appeared"):
        stream.wait_for_frames(path, 1, timeout_s=0.3, poll_s=0.05)
    with pytest.raises(DatasetError, match="does not exist"):
        stream.open_frames(path)
    w = dp.open_writer(path, like=sim, chunk_frames=4)
    st = stream.stream_state(path)
    assert (st.exists, st.frames_complete, st.scan_finished, st.streamed) == (True, 0, False, True)
    assert st.last_commit_utc is None and st.heartbeat_utc is not None
    view = stream.open_frames(path)
    assert view.sizes["scan"] == 0 and view["intensity"].shape == (0, 16, 16)
    from daskptycho.cli import main

    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a growing daskptycho dataset" in out and "frames committed: 0, in chunks of 4" in out
    with pytest.raises(DatasetError, match="no frame was appended"):
        w.finish()
    w.close()


# --------------------------------------------------------------------------- damaged chunks


def test_a_truncated_or_missing_committed_chunk_names_the_array_and_frames(sim, tmp_path):
    path = tmp_path / "s.zarr"
    w = dp.open_writer(path, like=sim, chunk_frames=4)
    w.append(sim["intensity"].values[:12], sim["position"].values[:12])
    w.close()  # unfinished: 12 frames in 3 chunks
    chunk = path / "intensity" / "c" / "1" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as e:
        stream.open_frames(path)
    assert e.value.field == "intensity" and "frames 4 to 7" in str(e.value) and "truncated or corrupt" in str(e.value)
    lazy = stream.open_frames(path, check_values=False)  # opening reads no pattern; reading the chunk fails the same way
    with pytest.raises(DatasetError, match="frames 4 to 7"):
        lazy["intensity"].load()
    np.testing.assert_array_equal(stream.open_frames(path, 8, 12)["intensity"].values, sim["intensity"].values[8:12])
    chunk.unlink()
    with pytest.raises(DatasetError) as e:
        stream.open_frames(path, 2, 12)
    assert e.value.field == "intensity" and "frames 4 to 7" in str(e.value) and "missing" in str(e.value)
    chunk.write_bytes(data)
    (path / "position" / "c" / "2" / "0").write_bytes(b"\x00")
    with pytest.raises(DatasetError) as e:
        stream.open_frames(path)
    assert e.value.field == "position" and "frames 8 to 11" in str(e.value)


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def writer(sim, tmp_path):
    w = dp.open_writer(tmp_path / "w.zarr", like=sim, chunk_frames=4, n_frames=24)
    yield w
    w.close()


@pytest.mark.parametrize("case, field, needle", [
    ("shape", "intensity", "expected (J, 16, 16)"),
    ("ndim", "intensity", "expected (J, N, N)"),
    ("negative", "intensity", "negative values"),
    ("nan", "intensity", "NaN or inf"),
    ("positions", "position", "expected (2, 2)"),
    ("pixels", "position", "expected metres"),
    ("count", "n_frames", "more than the 24 announced"),
])
def test_bad_frames_are_refused_naming_the_field(writer, sim, case, field, needle):
    inten, pos = sim["intensity"].values[:2].copy(), sim["position"].values[:2].copy()
    if case == "shape":
        inten = inten[:, :8]
    elif case == "ndim":
        inten = inten[:, 0, 0]
    elif case == "negative":
        inten[1, 3, 3] = -2
    elif case == "nan":
        inten[0, 0, 0] = np.nan
    elif case == "positions":
        pos = np.zeros((2, 3))
    elif case == "pixels":
        pos = pos / sim.attrs["pixel_size_m"] + 1
    elif case == "count":
        inten, pos = np.zeros((25, 16, 16)), np.zeros((25, 2))
    with pytest.raises((DatasetError, OptionsError)) as e:
        writer.append(inten, pos)
    assert getattr(e.value, "field", None) == field or getattr(e.value, "option", None) == field
    assert needle in str(e.value)
    assert writer.frames_appended == 0  # nothing was taken


def test_writer_misuse_is_refused(sim, tmp_path):
    path = tmp_path / "s.zarr"
    with dp.open_writer(path, like=sim, chunk_frames=4) as w:
        w.append(sim["intensity"].values[:5], sim["position"].values[:5])
        with pytest.raises(DatasetError, match="another writer"):
            dp.open_writer(path, resume=True)
    with pytest.raises(DatasetError) as e:
        w.append(sim["intensity"].values[:1], sim["position"].values[:1])
    assert e.value.field == "attrs.stream.scan_finished"
    with pytest.raises(OutputExistsError, match="resume=True"):
        dp.open_writer(path, like=sim)
    with pytest.raises(DatasetError) as e:
        dp.open_writer(path, resume=True)
    assert e.value.field == "attrs.stream.scan_finished"
    plain = tmp_path / "plain.zarr"
    dp.write_dataset(sim, plain)
    with pytest.raises(DatasetError, match="ordinary dataset store"):
        dp.open_writer(plain, resume=True)
    st = stream.stream_state(plain)  # an ordinary store is a finished one
    assert (st.frames_complete, st.scan_finished, st.streamed) == (24, True, False)
    assert stream.open_frames(plain, 20)["scan"].values.tolist() == [20, 21, 22, 23]

    growing = tmp_path / "g.zarr"
    dp.open_writer(growing, like=sim, chunk_frames=4).close()
    with pytest.raises(OptionsError, match="window"):
        dp.open_writer(growing, resume=True, window=(32, 32))
    with pytest.raises(DatasetError) as e:
        dp.open_writer(growing, resume=True, pixel_size_m=2 * sim.attrs["pixel_size_m"])
    assert e.value.field == "attrs.pixel_size_m"
    with pytest.raises(OptionsError, match="chunk_frames"):
        dp.open_writer(growing, resume=True, chunk_frames=8)
    with pytest.raises(OptionsError, match="stop"):
        stream.open_frames(growing, 0, 4)

    meta = _meta(sim)
    for change, name in (({"chunk_frames": 0}, "chunk_frames"), ({"window": None}, "window"), ({"window": (16,)}, "window")):
        with pytest.raises(OptionsError) as e:
            dp.open_writer(tmp_path / "x.zarr", **{**meta, **change})
        assert e.value.option == name
    with pytest.raises(DatasetError) as e:
        dp.open_writer(tmp_path / "x.zarr", **{**meta, "radiation": "neutron"})
    assert e.value.field == "attrs.radiation"
    with pytest.raises(OptionsError) as e:
        stream.replay(sim, tmp_path / "x.zarr", 0)
    assert e.value.option == "rate_hz"
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("args, flag", [
    (["--stream", "0"], "--stream"),
    (["--stream", "-3"], "--stream"),
    (["--stream", "nan"], "--stream"),
    (["--stream", "inf"], "--stream"),
    (["--stream", "fast"], "--stream"),
    (["--stream", "10", "--chunk-frames", "0"], "--chunk-frames"),
])
def test_cli_refuses_bad_stream_values_with_status_2(args, flag, tmp_path, capsys):
    from daskptycho.cli import main

    out = tmp_path / "s.zarr"
    assert main(["simulate", str(out), "--scan", "2x2", "--detector", "16", "--slices", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err
    assert not out.exists()
