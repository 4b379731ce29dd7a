"""Scan-position correction: the per-position cost and its parabolic refinement
(daskptycho.physics.positions), engines ml and gd (tile-local) recovering known position
errors, the options (refused by the engines that do not refine positions), checkpoints
and the command line."""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest

import daskptycho as dp
from daskptycho import physics
from daskptycho.engines import engine_options
from daskptycho.engines.ml import positions_in_metres, run_ml_state
from daskptycho.engines.problem import prepare, result_dataset
from daskptycho.errors import OptionsError
from daskptycho.io.patterns import load_patterns
from daskptycho.metrics import registered_error as metrics_registered_error
from daskptycho.physics.positions import (
    STENCIL,
    parabolic_minimum,
    position_costs,
    refine_positions,
    remove_mean_shift,
    search_positions,
)


@pytest.fixture(scope="module")
def image():
    """A noise-free X-ray scan of the test image: 12x12 positions 4 px apart, 64 px patterns."""
    return dp.simulate(kind="image", scan=(12, 12), detector=64)


def perturbed(ds, rms_px, seed):
    """``ds`` with every position coordinate moved by a Gaussian error of ``rms_px`` pixels."""
    err = np.random.default_rng(seed).normal(0.0, rms_px, ds["position"].shape)
    bad = ds.copy()
    bad["position"] = ds["position"] + err * ds.attrs["pixel_size_m"]
    return bad


def rms_error_px(position_m, truth_m, dx):
    """RMS over both coordinates of every position, pixels, after the common shift is removed."""
    d = remove_mean_shift(np.asarray(position_m) / dx, np.asarray(truth_m) / dx) - np.asarray(truth_m) / dx
    return float(np.sqrt(np.mean(d ** 2)))


def registered_error(obj, truth, position):
    """Mean error and phase correlation at the best whole-pixel registration (metrics)."""
    return metrics_registered_error(obj, truth, position, reach=2)[:2]


# --------------------------------------------------------------------------- the physics

@pytest.mark.parametrize("kind, cost", [("image", "amplitude"), ("image", "poisson"), ("pbtio3", "amplitude")])
def test_the_cost_of_each_position_is_least_at_its_true_window(kind, cost):
    ds = dp.simulate(kind=kind, scan=(5, 5), detector=64, **({"slices": 2} if kind == "pbtio3" else {}))
    problem = prepare(ds, engine_options(engine="ml", slices=ds.sizes["slice"], cost=cost))
    obj, probe, data = ds["truth_object"].values, ds["truth_probe"].values, load_patterns(ds)
    mask = np.ones(problem.window, dtype=bool)
    mask[:3, :5] = False  # a few dead pixels (FFT order): the cost leaves them out
    offsets = np.array([(a, b) for a in range(-3, 4) for b in range(-3, 4)])
    costs = position_costs(obj, probe, problem.corners, problem.kernel, data, offsets, mask, cost, chunk=40)
    assert costs.shape == (25, 49) and costs.dtype == np.float64
    assert np.all(np.argmin(costs, axis=1) == 24)  # offset (0, 0)
    assert np.all(np.sort(costs, axis=1)[:, 1] > costs[:, 24])  # a strict minimum
    # the same cost as the engine's, per position
    far = physics.forward(obj, probe, physics.windows(problem.corners, problem.window, obj.shape[-2:]), problem.kernel)
    total = (physics.amplitude_cost if cost == "amplitude" else physics.poisson_cost)(far, data, mask)
    np.testing.assert_allclose(costs[:, 24].sum(), total, rtol=1e-6)
    # windows that leave the object cost inf
    edge = position_costs(obj, probe, problem.corners[:1], problem.kernel, data[:1], [(0, 0), (-1000, 0)], mask, cost)
    assert np.isfinite(edge[0, 0]) and edge[0, 1] == np.inf


def test_the_parabola_finds_the_vertex_and_rejects_what_is_no_minimum():
    vertex = np.array([[0.3, -0.7], [0.0, 0.45], [-2.5, 1.8]])
    offsets = STENCIL.astype(float)
    costs = np.stack([np.sum(3.0 * (o - vertex) ** 2, axis=1) + 5.0 for o in offsets], axis=1)
    shift, ok = parabolic_minimum(costs, max_step_px=1.0)
    assert ok.all()
    np.testing.assert_allclose(shift, np.clip(vertex, -1, 1))
    concave = np.array([[1.0, 0.5, 0.6, 2.0, 2.0], [1.0, np.inf, 2.0, 1.0, 1.0]])
    shift, ok = parabolic_minimum(concave)
    assert ok.tolist() == [[False, True], [False, False]] and shift[0, 0] == 0 and shift[1].tolist() == [0, 0]
    with pytest.raises(ValueError, match="STENCIL"):
        parabolic_minimum(np.zeros((3, 4)))


def test_refinement_and_search_bring_positions_to_the_truth_on_any_patch(image):
    ds = image
    problem = prepare(ds, engine_options(engine="ml", position_correction=True))
    obj, probe, data = ds["truth_object"].values, ds["truth_probe"].values, load_patterns(ds)
    # the truth on the correcting grid (its margin is ones, unseen by these windows)
    m = (problem.grid.shape[0] - obj.shape[1]) // 2
    big = np.ones((1,) + problem.grid.shape, dtype=np.complex64)
    big[:, m:m + obj.shape[1], m:m + obj.shape[2]] = obj
    truth = problem.grid.pixel_coordinates(ds["position"].values)
    rng = np.random.default_rng(7)
    start = truth + rng.uniform(-1.4, 1.4, truth.shape)
    est = start
    for _ in range(10):
        est = refine_positions(big, probe, problem.kernel, data, est, start, max_shift_px=3.0, step=0.5)
    # within what a parabola through whole-pixel costs of an asymmetric basin can tell
    assert np.abs(est - truth).max() < 0.1 and np.sqrt(np.mean((est - truth) ** 2)) < 0.03
    # farther than the parabola reaches: one search first
    start = truth + rng.choice([-3, -2, 2, 3], truth.shape) + rng.uniform(-0.3, 0.3, truth.shape)
    found = search_positions(big, probe, problem.kernel, data, start, start, 3, max_shift_px=3.5)
    np.testing.assert_array_equal(np.rint(found), np.rint(truth))
    # a tile's own patch, corners on the patch: the same refinement for the positions it holds
    sel = np.flatnonzero((truth[:, 0] < truth[:, 0].min() + 20) & (truth[:, 1] < truth[:, 1].min() + 20))
    y0, x0 = 2, 3
    patch = np.ascontiguousarray(big[:, y0:y0 + 90, x0:x0 + 90])
    est = truth[sel] + 0.4
    whole = refine_positions(big, probe, problem.kernel, data[sel], est, est, max_shift_px=3.0)
    local = refine_positions(patch, probe, problem.kernel, data[sel], est - (y0, x0), est - (y0, x0), max_shift_px=3.0)
    np.testing.assert_allclose(local + (y0, x0), whole, atol=1e-12)
    assert np.abs(whole - truth[sel]).max() < 0.25
    with pytest.raises(ValueError, match="estimate and start"):
        refine_positions(big, probe, problem.kernel, data, truth[:3], truth[:4])


# --------------------------------------------------------------------------- engine ml

def _run(bad, iterations, **kw):
    problem = prepare(bad, engine_options(engine="ml", iterations=iterations, **kw))
    state, costs = run_ml_state(problem, load_patterns(bad))
    return problem, state, costs


def test_ml_recovers_most_of_a_1px_rms_position_error_and_the_image_improves(image):
    ds, dx = image, image.attrs["pixel_size_m"]
    bad = perturbed(ds, 1.0, seed=1)
    before = rms_error_px(bad["position"].values, ds["position"].values, dx)
    assert 0.85 < before < 1.15
    results = {}
    for on in (False, True):
        problem, state, costs = _run(bad, 50, position_correction=on)
        res = result_dataset(problem, state["object"], state["probe"], costs, bad)
        results[on] = registered_error(res["object"], ds["truth_object"], ds["position"].values)
    after = rms_error_px(positions_in_metres(problem, state["positions"]), ds["position"].values, dx)
    assert after < 0.3 * before, (before, after)
    (err_off, r_off), (err_on, r_on) = results[False], results[True]
    assert err_on < 0.9 * err_off and r_on > r_off, results


def test_ml_without_position_correction_carries_no_positions(image):
    problem, state, _ = _run(image, 2)
    assert "positions" not in state
    plain = prepare(image, engine_options(engine="ml"))
    wide = prepare(image, engine_options(engine="ml", position_correction=True, position_max_shift_px=2.5))
    # the correcting grid has room for every window to move: ceil(2.5) + 1 pixels each side
    assert tuple(np.subtract(wide.grid.shape, plain.grid.shape)) == (8, 8)
    np.testing.assert_array_equal(wide.corners, plain.corners + 4)


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("engine", ["hve", "dm"])
@pytest.mark.parametrize("key, value", [("position_correction", True), ("position_max_shift_px", 2.0),
                                        ("position_correction_start", 3), ("position_correction_every", 2)])
def test_engines_without_position_correction_refuse_its_options(engine, key, value):
    with pytest.raises(OptionsError) as e:
        engine_options(engine=engine, **{key: value})
    assert e.value.parameter == key and "'gd' and 'ml'" in str(e.value)


@pytest.mark.parametrize("engine", ["ml", "gd"])
@pytest.mark.parametrize("key, value", [("position_correction", "yes"), ("position_max_shift_px", 0), ("position_max_shift_px", -1.0),
                                        ("position_correction_start", -1), ("position_correction_every", 0)])
def test_bad_position_options_are_refused_by_name(engine, key, value):
    with pytest.raises(OptionsError) as e:
        engine_options(engine=engine, **{key: value})
    assert e.value.parameter == key


# --------------------------------------------------------------------------- a cluster, checkpoints, the store, the command line

@pytest.fixture(scope="module")
def perturbed_store(tmp_path_factory):
    """A small perturbed pbtio3 store (8x8 positions, 32 px, 2 slices, 1 px rms errors)."""
    ds = dp.simulate(kind="pbtio3", scan=(8, 8), detector=32, slices=2, max_angle_rad=60e-3, defocus_m=60e-10)
    path = tmp_path_factory.mktemp("data") / "perturbed.zarr"
    dp.write_dataset(perturbed(ds, 1.0, seed=3), path)
    return path


KW = dict(engine="ml", slices=2, position_correction=True, position_correction_start=2, position_correction_every=2, batch_size=16,
          minibatch_fraction=1.0)  # minibatches throughout: the resumed run extends the total


def test_resume_with_position_correction_is_bit_exact_and_the_result_keeps_the_positions(perturbed_store, client, tmp_path):
    ds = dp.open_dataset(perturbed_store)
    whole = dp.reconstruct(ds, iterations=8, client=client, **KW)
    out = str(tmp_path / "out.zarr")
    dp.reconstruct(ds, iterations=4, client=client, checkpoint=out, checkpoint_every=4, **KW)
    rest = dp.reconstruct(ds, iterations=8, client=client, checkpoint=out, resume=True, **KW)
    assert rest.attrs["resumed_from_iteration"] == 4
    for v in ("object", "probe", "cost", "position_refined"):
        np.testing.assert_array_equal(whole[v].values, rest[v].values, err_msg=v)
    pos = whole["position_refined"]
    assert pos.dims == ("scan", "yx") and pos.dtype == np.float64 and pos.attrs["units"] == "m"
    moved = np.abs(pos.values - ds["position"].values).max() / ds.attrs["pixel_size_m"]
    assert 0 < moved <= 3.0 + 0.5
    path = tmp_path / "result.zarr"
    dp.write_result(whole, path)
    back = dp.open_result(path)
    np.testing.assert_array_equal(back["position_refined"].values, pos.values)


def test_cli_position_correction(perturbed_store, tmp_path, capsys):
    from daskptycho.cli import main

    out = tmp_path / "r.zarr"
    assert main(["reconstruct", str(perturbed_store), "--out", str(out), "--engine", "ml", "--slices", "2", "--iterations", "4",
                 "--position-correction", "--position-correction-start", "1", "--position-max-shift", "2", "--workers", "1",
                 "--quiet"]) == 0
    res = dp.open_result(out)
    assert "position_refined" in res and '"position_max_shift_px": 2.0' in res.attrs["options"]
    assert main(["info", str(out)]) == 0
    capsys.readouterr()
    assert main(["reconstruct", str(perturbed_store), "--out", str(tmp_path / "g.zarr"), "--engine", "hve", "--position-correction"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("daskptycho: error: --position-correction") and "'gd' and 'ml'" in err[0], err
    assert main(["reconstruct", str(perturbed_store), "--out", str(tmp_path / "m.zarr"), "--engine", "ml",
                 "--position-max-shift", "0"]) == 2
    assert "--position-max-shift" in capsys.readouterr().err


# --------------------------------------------------------------------------- engine gd: tile-local correction

def test_gd_halos_grow_by_the_margin_and_each_tile_refines_its_own_positions_in_the_graph(image):
    from daskptycho.engines.gd import context_for, tiling_for
    from daskptycho.schedule.passes import gd_iteration
    from daskptycho.tasks import tiles as tt

    for halo in ("probe", "window"):
        off = tiling_for(prepare(image, engine_options(engine="gd", tiles=(2, 2), halo=halo, halo_fraction=0.9)))
        on = tiling_for(prepare(image, engine_options(engine="gd", tiles=(2, 2), halo=halo, halo_fraction=0.9, position_correction=True,
                                                      position_max_shift_px=2.5)))
        assert tuple(np.subtract(on.halo, off.halo)) == (4, 4)  # ceil(2.5) + 1
        assert [t.positions.size for t in on] == [t.positions.size for t in off]
    problem = prepare(image, engine_options(engine="gd", tiles=(2, 2), position_correction=True))
    tiling = tiling_for(problem)
    ctx = context_for(problem, tiling)
    start = problem.grid.pixel_coordinates(problem.positions_m)
    for t in tiling:  # each tile's context holds its own positions, and its region's origin
        np.testing.assert_array_equal(ctx.position_start[t.key], start[t.positions])
        assert ctx.origins[t.key] == (t.extended[0], t.extended[2])
    states = {t.key: f"state-{t.row}-{t.col}" for t in tiling}
    data = {t.key: f"data-{t.row}-{t.col}" for t in tiling}
    plain = gd_iteration(tiling, 3, states, data, "probe", "ctx", tag="x")
    assert "positions" not in plain.outputs and not any(k[0] == "positions" for k in plain.tasks)
    assert all(len(v) == 9 for k, v in plain.tasks.items() if k[0] == "grad")  # today's tile_gradient call
    pos = {t.key: f"positions-{t.row}-{t.col}" for t in tiling}
    for mode, func in ((0, tt.kept_positions), (1, tt.tile_positions), (2, tt.tile_positions)):
        g = gd_iteration(tiling, 3, states, data, "probe", "ctx", tag="x", positions=pos, refine_positions=mode)
        for t in tiling:
            key = ("positions", 3, *t.key, "x")
            task = g.tasks[key]
            assert g.placement[key] == t.key and g.outputs["positions"][t.key] == key and task[0] is func
            # it reads its own tile's positions, state and patterns only
            assert task[1:] == (pos[t.key],) if mode == 0 else task[1:4] == (states[t.key], data[t.key], pos[t.key])
            if mode:
                assert task[-2:] == (t.key, mode == 2)
            assert g.tasks[("grad", 3, *t.key, "x")][-1] == key  # the gradient cuts its windows there


def test_a_tile_refines_every_position_it_owns_on_its_patch_even_where_windows_reach_past_it(image):
    from daskptycho.engines.gd import context_for, tiling_for
    from daskptycho.tasks.tiles import tile_positions

    ds = image
    problem = prepare(ds, engine_options(engine="gd", tiles=(2, 2), halo_fraction=0.9, position_correction=True))
    tiling = tiling_for(problem)
    ctx = context_for(problem, tiling)
    assert ctx.pads  # narrow probe halos: windows reach past the tiles
    obj, probe, data = ds["truth_object"].values, ds["truth_probe"].values, load_patterns(ds)
    m = (problem.grid.shape[0] - obj.shape[1]) // 2
    big = np.ones((1,) + problem.grid.shape, dtype=np.complex64)
    big[:, m:m + obj.shape[1], m:m + obj.shape[2]] = obj
    truth = problem.grid.pixel_coordinates(ds["position"].values)
    est = truth + np.random.default_rng(5).uniform(-0.45, 0.45, truth.shape)
    for t in tiling:
        y0, y1, x0, x1 = t.extended
        patch = np.ascontiguousarray(big[:, y0:y1, x0:x1])
        own = t.positions
        new = est[own]
        for _ in range(6):
            new = tile_positions(patch, data[own], new, probe, ctx, t.key, False)
        assert new.shape == (own.size, 2) and np.isfinite(new).all()
        assert np.sqrt(np.mean((new - truth[own]) ** 2)) < 0.5 * np.sqrt(np.mean((est[own] - truth[own]) ** 2))


def test_gd_recovers_most_of_a_1px_rms_position_error_on_its_tiles_in_both_exchange_modes(image, client):
    ds, dx = image, image.attrs["pixel_size_m"]
    bad = perturbed(ds, 1.0, seed=1)  # the ml test's data
    before = rms_error_px(bad["position"].values, ds["position"].values, dx)
    kw = dict(engine="gd", tiles=(2, 2), iterations=50, client=client)
    peer = dp.reconstruct(bad, position_correction=True, **kw)
    with dask.config.set({"daskptycho.schedule.exchange": "scheduler"}):
        scheduler = dp.reconstruct(bad, position_correction=True, **kw)
    for v in ("object", "probe", "cost", "position_refined"):
        np.testing.assert_array_equal(peer[v].values, scheduler[v].values, err_msg=v)
    after = rms_error_px(peer["position_refined"].values, ds["position"].values, dx)
    assert after < 0.3 * before, (before, after)
    off = dp.reconstruct(bad, **kw)
    assert "position_refined" not in off
    err_off, r_off = registered_error(off["object"], ds["truth_object"], ds["position"].values)
    err_on, r_on = registered_error(peer["object"], ds["truth_object"], ds["position"].values)
    assert err_on < 0.9 * err_off and r_on > r_off, (err_on, err_off, r_on, r_off)


def test_gd_on_one_tile_with_whole_windows_is_ml_with_position_correction(image, client):
    bad = perturbed(image, 1.0, seed=2)
    kw = dict(iterations=12, position_correction=True, position_correction_start=3, position_correction_every=2, batch_size=None,
              client=client)
    ml = dp.reconstruct(bad, engine="ml", **kw)
    gd = dp.reconstruct(bad, engine="gd", tiles=(1, 1), halo="window", **kw)
    assert gd.attrs["tiles"] == "1x1" and gd["object"].shape == ml["object"].shape
    np.testing.assert_allclose(gd["position_refined"].values, ml["position_refined"].values, rtol=0, atol=1e-6 * image.attrs["pixel_size_m"])
    np.testing.assert_allclose(gd["object"].values, ml["object"].values, rtol=0, atol=1e-5)
    np.testing.assert_allclose(gd["cost"].values, ml["cost"].values, rtol=1e-6)


GD = dict(engine="gd", slices=2, tiles=(2, 2), halo_fraction=0.9, position_correction=True, position_correction_start=1,
          position_correction_every=2)


def test_gd_resume_with_position_correction_is_bit_exact_and_each_tile_keeps_its_own_positions(perturbed_store, client, tmp_path):
    from daskptycho.engines.gd import tiling_for
    from daskptycho.io.checkpoint import Checkpoint, read_array

    ds = dp.open_dataset(perturbed_store)
    whole = dp.reconstruct(ds, iterations=6, client=client, **GD)
    out = str(tmp_path / "out.zarr")
    dp.reconstruct(ds, iterations=3, client=client, checkpoint=out, checkpoint_every=3, **GD)
    rest = dp.reconstruct(ds, iterations=6, client=client, checkpoint=out, resume=True, checkpoint_every=3, **GD)
    assert rest.attrs["resumed_from_iteration"] == 3
    for v in ("object", "probe", "cost", "position_refined"):
        np.testing.assert_array_equal(whole[v].values, rest[v].values, err_msg=v)
    # narrow probe halos (windows reach past the tiles) and each tile writes exactly the positions it owns
    problem = prepare(ds, engine_options(**GD))
    tiling = tiling_for(problem)
    assert json.loads(whole.attrs["tile_extended"]) == {f"{t.row},{t.col}": list(t.extended) for t in tiling}
    meta = Checkpoint(out).latest()
    assert int(meta["completed"]) == 6
    refined = problem.grid.pixel_coordinates(whole["position_refined"].values)
    start = problem.grid.pixel_coordinates(ds["position"].values)
    assert np.abs(refined - start).max() > 0.1  # they moved
    for t in tiling:
        held = read_array(meta["group"], f"positions-{t.row}-{t.col}")
        assert held.shape == (t.positions.size, 2) and held.dtype == np.float64
        np.testing.assert_allclose(held, refined[t.positions], rtol=0, atol=1e-9)
    assert np.isfinite(whole["position_refined"].values).all()


def test_registered_error_finds_a_whole_pixel_shift():
    # the truth itself, its coordinates moved by 2 pixels: registration finds the shift back
    ds = dp.simulate(kind="image", scan=(8, 8), detector=32)
    truth = ds["truth_object"]
    dx = float(truth.y[1] - truth.y[0])
    moved = truth.assign_coords(y=truth.y + 2 * dx)
    err, r, shift = metrics_registered_error(moved, truth, ds["position"].values, reach=3)
    assert shift == (-2, 0) and err < 1e-6 and r > 0.9999
    assert metrics_registered_error(moved, truth, ds["position"].values, reach=1)[0] > 1e-3  # out of reach
