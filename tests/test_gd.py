"""Gradient decomposition and Halo Voxel Exchange on a real 2-worker LocalCluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

import daskptycho as dp
from daskptycho.engines.ml import load_patterns, run_ml
from daskptycho.engines.problem import ReconstructOptions, prepare
from daskptycho.metrics import phase_correlation


@pytest.fixture(scope="module")
def pbtio3_12(tmp_path_factory):
    path = tmp_path_factory.mktemp("gd") / "pbtio3.zarr"
    ds = dp.simulate(kind="pbtio3", scan=(12, 12), detector=32, slices=2, max_angle_rad=60e-3, defocus_m=60e-10)
    dp.write_dataset(ds, path)
    return path


def _ml(ds, **kw):
    return run_ml(prepare(ds, ReconstructOptions(**kw)), load_patterns(ds))


@pytest.mark.parametrize("tiles", [(2, 2), (3, 3)])
def test_gd_batch_mode_is_full_batch_gradient_descent(pbtio3_12, client, tiles):
    ds = dp.open_dataset(pbtio3_12)
    ref_obj, _, ref_cost = _ml(ds, iterations=5, slices=2)
    res = dp.reconstruct(ds, engine="gd", tiles=tiles, iterations=5, local_updates=False, slices=2, client=client)
    rel = np.linalg.norm(res.object.values - ref_obj) / np.linalg.norm(ref_obj)
    assert rel < 1e-4, rel
    np.testing.assert_allclose(res.cost.values, ref_cost, rtol=1e-4)
    assert res.attrs["tiles"] == f"{tiles[0]}x{tiles[1]}"
    mem = json.loads(res.attrs["memory"])
    assert len(mem["tile_bytes"]) == tiles[0] * tiles[1]
    assert set(mem["tile_workers"].values()) <= set(client.scheduler_info()["workers"])
    assert all(v > 0 for v in mem["worker_peak_above_baseline_bytes"].values())


def test_gd_with_probe_refinement_matches_ml(pbtio3_12, client):
    ds = dp.open_dataset(pbtio3_12).load()
    ds.attrs["probe_defocus_m"] *= 1.2
    kw = dict(iterations=4, slices=2, refine_probe=True, probe_refine_start=1, probe_step=1.0)
    ref_obj, ref_probe, _ = _ml(ds, **kw)
    res = dp.reconstruct(ds, engine="gd", tiles=(2, 3), client=client, **kw)
    assert np.linalg.norm(res.probe.values - ref_probe) / np.linalg.norm(ref_probe) < 1e-4
    assert np.linalg.norm(res.object.values - ref_obj) / np.linalg.norm(ref_obj) < 1e-4


def test_gd_rounds_and_local_updates_converge(pbtio3_12, client):
    ds = dp.open_dataset(pbtio3_12)
    res = dp.reconstruct(ds, engine="gd", tiles=(2, 2), iterations=8, slices=2, passes_per_iteration=2,
                         local_updates=True, batch_size=8, step=0.5, client=client)
    c = res.cost.values
    assert c[-1] < 0.05 * c[0]
    r, _ = phase_correlation(res.object, ds.truth_object, ds.position.values)
    assert r > 0.9, r


def test_hve_reconstructs_and_holds_more_per_tile(pbtio3_12, client):
    ds = dp.open_dataset(pbtio3_12)
    gd = dp.reconstruct(ds, engine="gd", tiles=(2, 2), iterations=10, slices=2, client=client)
    hve = dp.reconstruct(ds, engine="hve", tiles=(2, 2), iterations=10, slices=2, client=client)
    r_gd, _ = phase_correlation(gd.object, ds.truth_object, ds.position.values)
    r_hve, _ = phase_correlation(hve.object, ds.truth_object, ds.position.values)
    assert r_gd > 0.95 and r_hve > 0.9, (r_gd, r_hve)
    mg = json.loads(gd.attrs["memory"])["tile_bytes"]
    mh = json.loads(hve.attrs["memory"])["tile_bytes"]
    for k in mg:
        assert sum(mh[k].values()) > sum(mg[k].values())
        assert mh[k]["patterns"] > mg[k]["patterns"]  # hve also holds its neighbours' positions


def test_tiles_larger_than_the_field_is_an_options_error(pbtio3_12, client):
    with pytest.raises(dp.OptionsError, match="tiles"):
        dp.reconstruct(dp.open_dataset(pbtio3_12), engine="gd", tiles=(50, 50), iterations=1, client=client)
