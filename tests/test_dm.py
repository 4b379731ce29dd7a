"""The multi-mode difference map on a real LocalCluster."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

import daskptycho as dp
from daskptycho.engines import engine_options
from daskptycho.engines.dm import DMRun, part_region, partition_positions
from daskptycho.engines.problem import prepare
from daskptycho.metrics import phase_correlation
from daskptycho.physics import dm, window_index
from daskptycho.schedule.dm import dm_iteration
from daskptycho.tasks import dm as dt


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dm") / "image.zarr"
    dp.write_dataset(dp.simulate(kind="image", scan=(10, 10), detector=32, max_angle_rad=7.75e-3 / 2,
                                 semiangle_rad=1.2e-3, defocus_m=60e-6), path)
    return path


def test_dm_same_result_on_1_2_4_parts(image_store, client):
    ds = dp.open_dataset(image_store)
    out = {k: dp.reconstruct(ds, engine="dm", iterations=10, partitions=k, client=client) for k in (1, 2, 4)}
    ref = out[1].object.values
    for k in (2, 4):
        assert np.linalg.norm(out[k].object.values - ref) / np.linalg.norm(ref) < 1e-4
        assert out[k].attrs["partitions"] == k
    res = out[4]
    assert res.cost.values[-1] < 0.1 * res.cost.values[0]  # the Fourier error falls
    r, _ = phase_correlation(res.object, ds.truth_object, ds.position.values)
    assert r > 0.8, r
    assert res.object_change.dims == ("iteration",) and res.probe_change.dims == ("iteration", "mode")
    assert len(json.loads(res.attrs["memory"])["tile_bytes"]) == 4


def test_dm_even_split_by_index_matches_blocks(image_store, client):
    ds = dp.open_dataset(image_store)
    a = dp.reconstruct(ds, engine="dm", iterations=5, partitions=3, partition="index", client=client)
    b = dp.reconstruct(ds, engine="dm", iterations=5, partitions=3, partition="blocks", client=client)
    assert np.linalg.norm(a.object.values - b.object.values) / np.linalg.norm(b.object.values) < 1e-4


def test_partitions_cover_every_position_once(image_store):
    ds = dp.open_dataset(image_store)
    p = prepare(ds, engine_options(engine="dm"))
    for how in ("blocks", "index"):
        parts = partition_positions(p, 4, how)
        allp = np.sort(np.concatenate(parts))
        np.testing.assert_array_equal(allp, np.arange(p.n_positions))
        assert min(len(x) for x in parts) > 0
    # blocks are spatially compact: smaller windows' bounding boxes than an index split of a raster
    def area(parts):
        return sum(np.ptp(p.corners[x][:, 0]) * np.ptp(p.corners[x][:, 1]) for x in parts)
    assert area(partition_positions(p, 4, "blocks")) < area(partition_positions(p, 4, "index"))


def test_modes_are_orthogonal_and_fractions_sum_to_one(image_store, client):
    ds = dp.open_dataset(image_store)
    res = dp.reconstruct(ds, engine="dm", iterations=6, probe_modes=3, partitions=2, client=client)
    f = res.probe_power_fraction.values
    np.testing.assert_allclose(f.sum(), 1.0, rtol=1e-6)
    assert np.all(np.diff(f) <= 0)
    flat = res.probe.values.reshape(3, -1).astype(np.complex128)
    gram = flat.conj() @ flat.T
    off = np.abs(gram - np.diag(np.diag(gram))).max()
    assert off < 1e-3 * np.abs(np.diag(gram)).max()


def test_fourier_constraint_replaces_the_modulus_and_honours_the_mask():
    rng = np.random.default_rng(0)
    waves = (rng.standard_normal((3, 2, 1, 8, 8)) + 1j * rng.standard_normal((3, 2, 1, 8, 8))).astype(np.complex128)
    inten = rng.random((3, 8, 8)) * 10
    mask = rng.random((8, 8)) > 0.3
    out = dm.fourier_constraint(waves, inten, mask)
    far_in = np.fft.fft2(waves, norm="ortho")
    far = np.fft.fft2(out, norm="ortho")
    total = np.sum(np.abs(far) ** 2, axis=(1, 2))
    np.testing.assert_allclose(total[:, mask], inten[:, mask], rtol=1e-10)
    np.testing.assert_allclose(far[..., ~mask], far_in[..., ~mask], rtol=1e-12)  # unmasked pixels untouched
    # phases and the split between modes are kept
    ratio = far[:, :, 0][..., mask] / far_in[:, :, 0][..., mask]
    np.testing.assert_allclose(ratio[:, 0], ratio[:, 1], rtol=1e-10)
    assert np.allclose(np.angle(ratio), 0, atol=1e-10)


def test_dm_fixed_point_is_a_consistent_solution():
    """Views equal to P O of the true object are a fixed point of eq. 3."""
    rng = np.random.default_rng(1)
    obj = np.exp(1j * rng.random((1, 24, 24)))
    probe = rng.standard_normal((2, 8, 8)) + 1j * rng.standard_normal((2, 8, 8))
    corners = np.array([[0, 0], [4, 4], [8, 2], [16, 16]])
    idx = window_index(corners, (8, 8), (24, 24))
    po = dm.exit_waves(probe, obj, idx)
    inten = np.sum(np.abs(np.fft.fft2(po, norm="ortho")) ** 2, axis=(1, 2))
    new = dm.dm_update_views(po, probe, obj, idx, inten, None, 0.8)
    np.testing.assert_allclose(new, po, atol=1e-10)
    sums = dm.dm_partial_sums(po, probe, obj, idx)
    lit = sums["object_den"] > 0
    np.testing.assert_allclose((sums["object_num"][0] / np.where(lit, sums["object_den"], 1))[lit], obj[0][lit], rtol=1e-10)
    np.testing.assert_allclose(sums["probe_num"] / sums["probe_den"], probe, rtol=1e-10)


def test_dm_rejects_multislice(image_store, client):
    with pytest.raises(dp.OptionsError, match="slices"):
        dp.reconstruct(dp.open_dataset(image_store), engine="dm", slices=2, slice_thickness_m=1e-6, iterations=1, client=client)


def test_four_probe_modes_beat_one_on_a_fly_scan(tmp_path, client):
    """Fly-scan blur is an incoherent illumination: 4 modes fit it, 1 cannot."""
    from daskptycho.metrics import error_map

    path = tmp_path / "fly.zarr"
    dp.write_dataset(dp.simulate(kind="flyscan", scan=(12, 12), detector=48, seed=2), path)
    ds = dp.open_dataset(path)
    pad = int(ds.attrs["recommended_pad_px"])
    err, cost = {}, {}
    for m in (1, 4):
        res = dp.reconstruct(ds, engine="dm", iterations=15, probe_modes=m, pad_px=pad, partitions=2, client=client)
        err[m] = float(error_map(res.object, ds.truth_object, ds.position.values).mean())
        cost[m] = float(res.cost.values[-1])
        np.testing.assert_allclose(res.probe_power_fraction.values.sum(), 1.0, rtol=1e-6)
        if m == 4:
            assert res.probe_power_fraction.values[1] > 0.05  # the blur really lives in the extra modes
    assert err[4] < err[1], err
    assert cost[4] < cost[1], cost


# --------------------------------------------------------------------------- what moves (issue 16)

def _graph(n_parts, update_probe=True):
    parts = [(0, p) for p in range(n_parts)]
    regions = {p: (0, 8, 4 * p[1], 4 * p[1] + 8) for p in parts}
    per_part = {p: f"input-{p[1]}" for p in parts}
    return parts, dm_iteration(parts, 3, per_part, per_part, "probe", per_part, None, "object", "context", regions,
                               update_probe=update_probe, tag="t")


@pytest.mark.parametrize("n_parts", [1, 2, 3, 4])
def test_dm_graph_places_every_task_and_sends_only_crops(n_parts):
    parts, g = _graph(n_parts)
    home = parts[0]
    assert set(g.placement) == set(g.tasks)  # nothing is left for the scheduler to place
    deps = g.dependencies()
    whole = {k for k in g.tasks if k[0] in ("dm-object-update", "dm-probe-update") or (k[0] == "dm-object" and len(k) == 3)}
    for key, part in g.placement.items():
        if key[0] in ("dm-views", "dm-partial", "dm-error", "dm-state", "dm-crop", "dm-probe-partial"):
            assert part == (0, key[3]), key
        elif key[0] in ("dm-sum", "dm-probe-sum"):  # on its left operand's part: parts[2 ** (level + 1) * i]
            assert part == parts[2 ** (key[2] + 1) * key[3]], key
        else:  # the updates, the cutting of crops, the small results: on the object's home
            assert part == home, key
        if part != home:  # another worker's tasks never read the whole object or the updates' results
            assert not deps[key] & whole, key
    for p in parts:  # a crop is cut at home and copied on its part's worker: the cut alone crosses
        (cut,) = deps[("dm-crop", 3, *p, "t")]
        assert cut == ("dm-object", 3, *p, "t") and g.placement[cut] == home
        assert g.reaches(("dm-object", 3, "t"), cut)
    # the object is updated before the probe, from the new crops
    if n_parts > 1:
        assert g.reaches(("dm-object-update", 3, "t"), ("dm-probe-update", 3, "t"))
    assert {"states", "crops", "probe", "mixing", "object", "summary", "costs"} <= set(g.outputs)


def test_dm_graph_without_probe_update_keeps_the_probe_at_home():
    parts, g = _graph(4, update_probe=False)
    assert not [k for k in g.tasks if k[0] in ("dm-probe-partial", "dm-probe-sum")]
    assert g.placement[("dm-probe-update", 3, "t")] == parts[0]


def _full(p, name, shape):
    y0, y1, x0, x1 = p["region"]
    out = np.zeros(p[name].shape[:-2] + shape, p[name].dtype)
    out[..., y0:y1, x0:x1] = p[name]
    return out


def _partial(rng, region, modes=2):
    y0, y1, x0, x1 = region
    h, w = y1 - y0, x1 - x0
    return {"object_num": rng.standard_normal((modes, h, w)) + 1j * rng.standard_normal((modes, h, w)),
            "object_den": rng.random((h, w)), "region": region}


def test_partials_are_summed_on_the_union_of_their_regions_bit_for_bit():
    """The sum of two partials covers the smallest box holding both, and equals, bit for
    bit, the whole-grid sum in the same order (what the reduction did before)."""
    rng = np.random.default_rng(3)
    shape = (40, 50)
    a, b, c = (_partial(rng, r) for r in [(2, 20, 3, 25), (10, 30, 20, 44), (25, 38, 1, 12)])
    ab = dt.add_partials(a, b)
    assert ab["region"] == (2, 30, 3, 44)
    abc = dt.add_partials(ab, c)
    assert abc["region"] == (2, 38, 1, 44)
    for name in ("object_num", "object_den"):
        assert abc[name].dtype == a[name].dtype and abc[name].shape[-2:] == (36, 43)
        whole = (_full(a, name, shape) + _full(b, name, shape)) + _full(c, name, shape)
        np.testing.assert_array_equal(_full(abc, name, shape), whole)


def _context(regularization=1e-3):
    return dt.DMContext(mask=None, window=(8, 8), corners={}, regions={}, grid_shape=(40, 50), regularization=regularization)


def test_object_update_on_a_region_equals_the_whole_grid_update():
    rng = np.random.default_rng(4)
    shape = (40, 50)
    total = _partial(rng, (5, 30, 7, 41))
    total["object_den"][:3] = 0  # unlit rows keep the old object
    obj = (rng.standard_normal((2,) + shape) + 1j * rng.standard_normal((2,) + shape)).astype(np.complex64)
    for reg in (1e-3, 0.5):
        out = dt.object_update(total, obj, _context(reg))
        num, den = _full(total, "object_num", shape), _full(total, "object_den", shape)
        lit = den > 1e-6 * den.max()
        want = np.where(lit, num / (den + reg * den.max()), obj).astype(np.complex64)
        np.testing.assert_array_equal(out["object"], want)
        assert out["object"].dtype == np.complex64
        assert out["object_change"] == pytest.approx(float(dm.relative_change(want, obj)))
    assert not np.array_equal(dt.object_update(total, obj, _context(1e-3))["object"],
                              dt.object_update(total, obj, _context(0.5))["object"])


def test_dm_regularization_is_its_own_option(image_store, client):
    """dm's regularization (a fraction of each denominator's peak) defaults to 1e-3, not the
    other engines' preconditioner floor, and reaches the updates."""
    assert engine_options(engine="dm").regularization == 1e-3
    assert engine_options(engine="dm", regularization=0.25).regularization == 0.25
    with pytest.raises(dp.OptionsError, match="regularization"):
        engine_options(engine="dm", regularization=-1.0)
    ds = dp.open_dataset(image_store)
    kw = dict(engine="dm", iterations=3, partitions=2, client=client)
    default = dp.reconstruct(ds, **kw)
    same = dp.reconstruct(ds, regularization=1e-3, **kw)
    other = dp.reconstruct(ds, regularization=0.5, **kw)
    np.testing.assert_array_equal(default.object.values, same.object.values)
    assert not np.allclose(default.object.values, other.object.values)


def _scheduled_dm_iterations(dask_scheduler=None):
    return sorted({k[1] for k in dask_scheduler.tasks if isinstance(k, tuple) and k[:1] == ("dm-state",)})


def test_dm_moves_only_crops_and_region_sums_and_pipelines(image_store, client):
    """4 parts on 2 workers (the workers' own transfer logs): per iteration, what crossed
    workers is at most the parts' crops (complex64) and their partial sums (complex128 and
    float64, on their regions); the whole object never crossed, no message was as large as
    a float64 sum over the whole grid; and each iteration was submitted before the cost
    of the one before it came back."""
    ds = dp.open_dataset(image_store)
    kw = dict(engine="dm", partitions=4, probe_modes=2, probe_refine_start=0)
    problem = prepare(ds, engine_options(**kw))
    areas = [(y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in
             (part_region(problem.corners[idx], problem.window) for idx in partition_positions(problem, 4))]
    budget = sum(8 * a + 16 * a + 8 * a for a in areas)  # a crop, its numerator and denominator (one object mode)
    full_grid_f64 = 24 * int(np.prod(problem.grid.shape))
    ahead = {}

    def progress(it, cost):
        ahead[it] = client.run_on_scheduler(_scheduled_dm_iterations)

    client.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())  # this run's transfers only
    dp.reconstruct(ds, iterations=3, client=client, progress=progress, **kw)

    def incoming(dask_worker):
        return [dict(e["keys"]) for e in dask_worker.transfer_incoming_log]

    per_iteration = defaultdict(int)
    for entries in client.run(incoming).values():
        for keys in entries:
            for key, nbytes in keys.items():
                if not isinstance(key, tuple):
                    continue  # scattered inputs (context, probe), once per run
                assert not (key[0] in ("dm-object-update", "dm-object-init", "dm-object-restore", "host")
                            or (key[0] == "dm-object" and len(key) == 3)), (key, nbytes)  # never the whole object
                assert nbytes < full_grid_f64, (key, nbytes)
                if isinstance(key[1], int):
                    per_iteration[key[1]] += nbytes
    assert sorted(per_iteration) == [0, 1, 2], per_iteration
    assert max(per_iteration.values()) <= budget, (per_iteration, budget)
    assert ahead[0] and max(ahead[0]) >= 1 and max(ahead[1]) >= 2, ahead  # it + 1 in flight when it is reported
    assert DMRun.lookahead >= 1


# --------------------------------------------------------------------------- the view update: RAAR (issue 17)

def _tiny_views(seed=5, modes=2):
    """A tiny consistent problem: object (1, 20, 20), probe (modes, 8, 8), 6 windows, views
    P O plus noise (so that they are not a fixed point), and intensities of the noise-free
    views."""
    rng = np.random.default_rng(seed)
    obj = np.exp(1j * rng.random((1, 20, 20))) * (0.5 + rng.random((1, 20, 20)))
    probe = rng.standard_normal((modes, 8, 8)) + 1j * rng.standard_normal((modes, 8, 8))
    corners = np.array([[0, 0], [0, 6], [5, 3], [6, 12], [12, 2], [12, 12]])
    idx = window_index(corners, (8, 8), (20, 20))
    po = dm.exit_waves(probe, obj, idx)
    inten = np.sum(np.abs(np.fft.fft2(po, norm="ortho")) ** 2, axis=(1, 2))
    psi = po + 0.3 * (rng.standard_normal(po.shape) + 1j * rng.standard_normal(po.shape))
    return psi, probe, corners, idx, inten


def _np_overlap(psi, probe, corners, shape):
    """An independent P_O for a fixed probe: per-pixel least squares of the object over
    every window (loops and np.add.at), then its views. Returns (views, object)."""
    num = np.zeros(shape, np.complex128)
    den = np.zeros(shape, np.float64)
    n = probe.shape[-1]
    for j, (y, x) in enumerate(corners):
        num[y:y + n, x:x + n] += np.sum(probe.conj() * psi[j, :, 0], axis=0)
        den[y:y + n, x:x + n] += np.sum(np.abs(probe) ** 2, axis=0)
    obj = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
    views = np.stack([probe * obj[y:y + n, x:x + n] for y, x in corners])[:, :, None]
    return views, obj[None]


def _np_fourier(psi, inten):
    """An independent P_F: the far field's modulus summed over the modes set to the measured one."""
    far = np.fft.fft2(psi, norm="ortho")
    total = np.sum(np.abs(far) ** 2, axis=(1, 2), keepdims=True)
    return np.fft.ifft2(far * np.sqrt(inten[:, None, None] / total), norm="ortho")


def _inner(a, b):
    return np.vdot(a.ravel(), b.ravel())


def test_overlap_and_fourier_maps_are_projections():
    """P_O (eq. 6 then eq. 2, fixed probe) is an orthogonal projection: idempotent and
    self-adjoint, and the library's equals an independent one; P_F (eq. 4) is idempotent."""
    psi, probe, corners, idx, inten = _tiny_views()
    other = _tiny_views(seed=6)[0]
    p_o, _ = _np_overlap(psi, probe, corners, (20, 20))
    lib, _ = dm.overlap_projection(psi, probe, idx, (1, 20, 20))
    np.testing.assert_allclose(lib, p_o, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dm.overlap_projection(lib, probe, idx, (1, 20, 20))[0], lib, rtol=1e-10, atol=1e-12)
    p_o_other = dm.overlap_projection(other, probe, idx, (1, 20, 20))[0]
    assert _inner(lib, other) == pytest.approx(_inner(psi, p_o_other), rel=1e-10)  # <P x, y> = <x, P y>
    assert np.linalg.norm(lib - psi) > 0.1 * np.linalg.norm(psi)  # the noisy views are not in the set
    p_f = dm.fourier_constraint(psi, inten)
    np.testing.assert_allclose(p_f, _np_fourier(psi, inten), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dm.fourier_constraint(p_f, inten), p_f, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.0])
def test_raar_update_equals_the_formula(beta):
    """The view update "raar" is ``[beta/2 (R_F R_O + I) + (1 - beta) P_O] psi`` (R = 2 P - I),
    from independent NumPy projections; at beta = 1 it is eq. 3 with beta = 1, below it differs."""
    psi, probe, corners, idx, inten = _tiny_views()
    p_o, obj = _np_overlap(psi, probe, corners, (20, 20))
    r_o = 2 * p_o - psi
    r_f_r_o = 2 * _np_fourier(r_o, inten) - r_o
    want = beta / 2 * (r_f_r_o + psi) + (1 - beta) * p_o
    got = dm.raar_update_views(psi, probe, obj, idx, inten, None, beta)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(dm.update_views(psi, probe, obj, idx, inten, None, beta, "raar"), got)
    plain = dm.dm_update_views(psi, probe, obj, idx, inten, None, beta)
    if beta == 1.0:
        np.testing.assert_allclose(got, plain, rtol=1e-12, atol=1e-12)
    else:
        assert np.linalg.norm(got - plain) > 1e-3 * np.linalg.norm(plain)
    # a consistent solution stays put
    po_true = dm.exit_waves(probe, obj, idx)
    inten_true = np.sum(np.abs(np.fft.fft2(po_true, norm="ortho")) ** 2, axis=(1, 2))
    np.testing.assert_allclose(dm.raar_update_views(po_true, probe, obj, idx, inten_true, None, beta), po_true, atol=1e-10)


def _part_inputs(view_update, modes=2):
    psi, probe, corners, idx, inten = _tiny_views(modes=modes)
    part = (0, 0)
    ctx = dt.DMContext(mask=None, window=(8, 8), corners={part: corners}, regions={part: (0, 20, 0, 20)}, grid_shape=(20, 20),
                       view_update=view_update)
    crop = _np_overlap(psi, probe, corners, (20, 20))[1].astype(np.complex64)
    return psi.astype(np.complex64), inten.astype(np.float32), probe.astype(np.complex64), crop, ctx, part


@pytest.mark.parametrize("view_update", ["raar", "dm"])
def test_part_step_takes_the_view_update_of_its_context(view_update):
    """A part's step applies ``ctx.view_update``; "dm" is eq. 3 bit for bit."""
    views, data, probe, crop, ctx, part = _part_inputs(view_update)
    idx = window_index(ctx.corners[part], ctx.window, crop.shape[-2:])
    want = dm.VIEW_UPDATES[view_update](views.copy(), probe, crop, idx, data, None, ctx.beta)
    got = dt.part_step(views.copy(), data, probe, crop, None, ctx, part)
    np.testing.assert_array_equal(got["views"], want)
    sums = dm.dm_object_sums(want, probe, idx, crop.shape)
    np.testing.assert_allclose(got["partial"]["object_num"], sums["object_num"], rtol=1e-12)


@pytest.mark.parametrize("view_update", ["raar", "dm"])
def test_device_part_step_matches_the_host_one(view_update, monkeypatch):
    """The GPU part step's arithmetic (the kernels' host fallbacks, 4 positions per launch
    over 6): RAAR moves the views to beta psi + (1 - beta) P O before the kernel's eq. 3
    step, which gives the same views and object sums as the host path."""
    views, data, probe, crop, ctx, part = _part_inputs(view_update)
    host = dt.part_step(views.copy(), data, probe, crop, None, ctx, part)
    monkeypatch.setattr(dt, "_views_per_launch", lambda views, xp, work_arrays=1: 4)
    dev = dt._part_step_device(views.copy(), data, probe, crop, None, ctx, part)
    scale = np.abs(host["views"]).max()
    np.testing.assert_allclose(dev["views"], host["views"], atol=1e-5 * scale)
    np.testing.assert_allclose(dev["partial"]["object_num"], host["partial"]["object_num"], rtol=1e-4,
                               atol=1e-5 * np.abs(host["partial"]["object_num"]).max())
    assert dev["error"] == pytest.approx(host["error"], rel=1e-4)


def test_view_update_option_defaults_and_refusals():
    assert engine_options(engine="dm").view_update == "raar"
    assert engine_options(engine="dm", view_update="dm").view_update == "dm"
    with pytest.raises(dp.OptionsError, match="view_update"):
        engine_options(engine="dm", view_update="hio")
    with pytest.raises(dp.OptionsError, match="view_update"):
        engine_options(engine="gd", view_update="raar")
    from daskptycho.cli import _parser

    a = _parser().parse_args(["reconstruct", "in.zarr", "--out", "out.zarr", "--engine", "dm", "--view-update", "dm"])
    assert a.view_update == "dm"


@pytest.fixture(scope="module")
def noisy_fly_store(tmp_path_factory):
    """A small fly scan at a low dose (0.1 photons/A^2), where eq. 3 drifts within 60 iterations."""
    path = tmp_path_factory.mktemp("dm") / "fly-noisy.zarr"
    dp.write_dataset(dp.simulate(kind="flyscan", scan=(8, 8), detector=32, seed=2, dose=0.1), path)
    return path


def test_raar_does_not_drift_on_noisy_data_and_four_modes_beat_one(noisy_fly_store, client):
    """Error against the truth at iteration 60 no worse than at 20 with "raar" (1 and 4 modes;
    4 modes better than 1), where eq. 3 ("dm") with 4 modes rises on the same data."""
    from daskptycho.metrics import error_map

    ds = dp.open_dataset(noisy_fly_store)
    pad = int(ds.attrs["recommended_pad_px"])

    def error(n, **kw):
        res = dp.reconstruct(ds, engine="dm", iterations=n, pad_px=pad, partitions=2, client=client, **kw)
        return float(error_map(res.object, ds.truth_object, ds.position.values).mean())

    raar = {m: (error(20, probe_modes=m), error(60, probe_modes=m)) for m in (1, 4)}
    for m, (early, late) in raar.items():
        assert late <= early + 1e-3, (m, raar)
    assert raar[4][1] < raar[1][1], raar
    early, late = error(20, probe_modes=4, view_update="dm"), error(60, probe_modes=4, view_update="dm")
    assert late > early + 0.01, (early, late)  # the case does show the drift


def test_a_checkpoint_made_before_view_update_resumes_only_with_eq_3():
    from daskptycho.engines.dm import check_resume_view_update

    older = {"options": json.dumps({"engine": "dm", "beta": 0.8})}
    check_resume_view_update(older, "dm")
    with pytest.raises(dp.OptionsError, match="view_update.*'dm'"):
        check_resume_view_update(older, "raar")
    check_resume_view_update({"options": json.dumps({"view_update": "raar"})}, "raar")
    check_resume_view_update(None, "raar")
