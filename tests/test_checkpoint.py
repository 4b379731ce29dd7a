"""Checkpoints and resume: 10 iterations in one go equal 5 + resume to 10, bit for bit
(gd on 2x2 tiles over 2 workers, dm, ml), on a real LocalCluster and real Zarr stores."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import zarr

import daskptycho as dp
from daskptycho.cli import main
from daskptycho.io.checkpoint import Checkpoint

CASES = {
    # probe refinement from iteration 2: the probe, and for dm the mode mixing, are state too
    # ml and gd: minibatches in every iteration (their share is of the run's total iterations,
    # which the first run here stops short of)
    "gd": dict(engine="gd", tiles=(2, 2), slices=2, refine_probe=True, probe_refine_start=2, minibatch_fraction=1.0),
    "dm": dict(engine="dm", slices=1, probe_modes=2, probe_refine_start=2, partitions=2),
    "ml": dict(engine="ml", slices=2, batch_size=16, refine_probe=True, probe_refine_start=2, minibatch_fraction=1.0),
}


def _same(a, b):
    for v in ("object", "probe", "cost"):
        assert np.array_equal(a[v].values, b[v].values), v


@pytest.mark.parametrize("engine, every", [("gd", 5), ("dm", 1), ("ml", 5)])
def test_resume_is_bit_exact(small_pbtio3, client, tmp_path, engine, every):
    kw = CASES[engine]
    ds = dp.open_dataset(small_pbtio3)
    whole = dp.reconstruct(ds, iterations=10, client=client, **kw)
    out = str(tmp_path / "out.zarr")
    first = dp.reconstruct(ds, iterations=5, client=client, checkpoint=out, checkpoint_every=every, **kw)
    np.testing.assert_array_equal(first.cost.values, whole.cost.values[:5])
    meta = Checkpoint(out).latest()
    assert meta["completed"] == 5 and meta["engine"] == engine and meta["seed"] == 0
    assert os.listdir(os.path.join(out, "checkpoint")) == ["zarr.json", "it-000005"] or \
        sorted(os.listdir(os.path.join(out, "checkpoint"))) == ["it-000005", "zarr.json"]  # older ones removed
    rest = dp.reconstruct(ds, iterations=10, client=client, checkpoint=out, resume=True, checkpoint_every=every, **kw)
    _same(whole, rest)
    assert rest.attrs["resumed_from_iteration"] == 5
    assert Checkpoint(out).latest()["completed"] == 10


def test_gd_tiles_are_written_by_their_workers_as_held(small_pbtio3, client, tmp_path):
    ds = dp.open_dataset(small_pbtio3)
    out = str(tmp_path / "out.zarr")
    res = dp.reconstruct(ds, iterations=2, client=client, checkpoint=out, checkpoint_every=2, **CASES["gd"])
    meta = Checkpoint(out).latest()
    g = zarr.open_group(meta["group"], mode="r")
    ext = json.loads(res.attrs["tile_extended"])
    cores = json.loads(res.attrs["tile_cores"])
    for key, (y0, y1, x0, x1) in ext.items():
        patch = g[f"tile-{key.replace(',', '-')}"][...]
        assert patch.shape == (2, y1 - y0, x1 - x0) and patch.dtype == np.complex64
        c = cores[key]  # the core of each extended patch is the result's
        np.testing.assert_array_equal(patch[:, c[0] - y0:c[1] - y0, c[2] - x0:c[3] - x0],
                                      res.object.values[:, c[0]:c[1], c[2]:c[3]])
    assert meta["options"]["tiles"] == [2, 2] and "random_state" in meta
    np.testing.assert_array_equal(g["cost"][...], res.cost.values)


def test_a_partial_checkpoint_is_never_the_latest(small_pbtio3, client, tmp_path):
    """A run killed while writing leaves the pointer on the last complete checkpoint."""
    ds = dp.open_dataset(small_pbtio3)
    out = str(tmp_path / "out.zarr")
    kw = CASES["ml"]
    dp.reconstruct(ds, iterations=2, client=client, checkpoint=out, checkpoint_every=2, **kw)
    ck = Checkpoint(out)
    path = ck.begin(4, {"object": ((2, 4, 4), np.complex64)})  # started, never committed
    assert os.path.isdir(path) and ck.latest()["completed"] == 2
    res = dp.reconstruct(ds, iterations=3, client=client, checkpoint=out, resume=True, **kw)
    assert res.attrs["resumed_from_iteration"] == 2 and res.sizes["iteration"] == 3
    assert not os.path.exists(path)  # the partial one is cleared before resuming


def test_resume_refuses_what_it_cannot_continue(small_pbtio3, client, tmp_path):
    ds = dp.open_dataset(small_pbtio3)
    out = str(tmp_path / "out.zarr")
    kw = CASES["ml"]
    with pytest.raises(dp.OptionsError, match="resume.*no complete checkpoint"):
        dp.reconstruct(ds, iterations=3, client=client, checkpoint=out, resume=True, **kw)
    dp.reconstruct(ds, iterations=2, client=client, checkpoint=out, checkpoint_every=1, **kw)
    with pytest.raises(dp.OptionsError, match="'step'.*same value"):
        dp.reconstruct(ds, iterations=3, client=client, checkpoint=out, resume=True, **dict(kw, step=0.5))
    with pytest.raises(dp.OptionsError, match="'engine'"):
        dp.reconstruct(ds, iterations=3, client=client, checkpoint=out, resume=True, **dict(CASES["gd"], slices=2))
    with pytest.raises(dp.OptionsError, match="already completed 2 iterations"):
        dp.reconstruct(ds, iterations=2, client=client, checkpoint=out, resume=True, **kw)
    with pytest.raises(dp.OptionsError, match="checkpoint_every"):
        dp.reconstruct(ds, iterations=2, client=client, checkpoint=out, checkpoint_every=-1, **kw)


def test_cli_checkpoint_every_and_resume(small_pbtio3, tmp_path, capsys):
    out = str(tmp_path / "res.zarr")
    base = ["reconstruct", str(small_pbtio3), "--out", out, "--engine", "ml", "--slices", "2", "--quiet", "--workers", "1"]
    assert main(base + ["--iterations", "2", "--checkpoint-every", "1"]) == 0
    res = dp.open_result(out)  # a result, with its checkpoint kept inside
    assert res.sizes["iteration"] == 2 and Checkpoint(out).latest()["completed"] == 2
    capsys.readouterr()
    assert main(base + ["--iterations", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already completed 2 iterations" in err[0]
    assert main(base + ["--iterations", "3", "--resume", "--step", "0.5"]) == 2
    assert "--step:" in capsys.readouterr().err
    assert main(base + ["--iterations", "3", "--resume"]) == 0
    res = dp.open_result(out)
    assert res.sizes["iteration"] == 3 and res.attrs["resumed_from_iteration"] == 2
    assert Checkpoint(out).latest()["completed"] == 3


def test_a_checkpoint_of_an_older_version_resumes_when_new_options_keep_their_defaults():
    # options added since the checkpoint was made are not in its record: left at their
    # defaults (what the older version did) they pass; set otherwise they are named
    from daskptycho.engines import engine_options
    from daskptycho.io.checkpoint import check_resume

    defaults = dataclasses.asdict(engine_options(engine="gd"))
    older = {k: v for k, v in defaults.items() if k != "position_correction"}
    meta = {"engine": "gd", "completed": 2, "options": json.dumps(older, default=str)}
    check_resume(meta, dict(defaults, iterations=5), "gd", "ck.zarr", defaults=defaults)
    with pytest.raises(dp.OptionsError, match="'position_correction'"):
        check_resume(meta, dict(defaults, iterations=5, position_correction=True), "gd", "ck.zarr", defaults=defaults)
    with pytest.raises(dp.OptionsError, match="'position_correction'"):  # without the defaults: strict, as before
        check_resume(meta, dict(defaults, iterations=5), "gd", "ck.zarr")
