"""The multi-mode difference map on a real LocalCluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

import daskptycho as dp
from daskptycho.engines import engine_options
from daskptycho.engines.dm import partition_positions
from daskptycho.engines.problem import prepare
from daskptycho.metrics import phase_correlation
from daskptycho.physics import dm, window_index


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
