"""The default update rule (docs/convergence.md): equal minibatches for the first share of
the iterations, then full batch; probe modes kept as eigenmodes; the amplitude clip of
multislice objects; the starting modes every engine shares."""

from __future__ import annotations

import numpy as np
import pytest

import daskptycho as dp
from daskptycho import physics
from daskptycho.engines import engine_options
from daskptycho.engines.ml import run_ml
from daskptycho.engines.problem import prepare
from daskptycho.errors import OptionsError
from daskptycho.io.patterns import load_patterns
from daskptycho.tasks.updates import AUTO_MINIBATCHES, clip_amplitude, minibatches, probe_step


def test_minibatches_are_equal_and_auto_is_a_count():
    assert minibatches(400, None) == 1
    assert minibatches(400, "auto") == AUTO_MINIBATCHES == 4
    assert minibatches(3, "auto") == 3  # never more batches than positions
    assert minibatches(400, 133) == 4  # 4 batches of 100, not 3 of 133 and one of 1
    sizes = [len(b) for b in np.array_split(np.arange(400), minibatches(400, 133))]
    assert max(sizes) - min(sizes) <= 1


def test_the_minibatch_share_is_of_the_run_and_ends_in_full_batch():
    o = engine_options(engine="ml", iterations=50)
    assert o.batch_size == "auto" and o.minibatch_fraction == 0.7
    assert o.minibatch_iterations() == 35
    assert o.batch_at(34) == "auto" and o.batch_at(35) is None
    assert engine_options(engine="ml", iterations=50, batch_size=None).minibatch_iterations() == 0
    assert engine_options(engine="ml", iterations=5, minibatch_fraction=0).batch_at(0) is None
    g = engine_options(engine="gd", iterations=10)
    assert [g.rounds_at(i, 100) for i in range(10)] == [4] * 7 + [1] * 3
    assert engine_options(engine="gd", iterations=10, batch_size=25).rounds_at(0, 100) == 4
    assert engine_options(engine="gd", iterations=10, passes_per_iteration=2).rounds_at(9, 100) == 2
    assert engine_options(engine="gd", iterations=10, local_updates=True).rounds_at(0, 100) == 1
    for bad in (-0.1, 1.5):
        with pytest.raises(OptionsError, match="minibatch_fraction"):
            engine_options(engine="ml", minibatch_fraction=bad)
    with pytest.raises(OptionsError, match="batch_size"):
        engine_options(engine="ml", batch_size="half")
    # the baseline and dm keep their own rules
    assert engine_options(engine="hve").refine_probe is False
    with pytest.raises(OptionsError, match="object_amplitude_max"):
        engine_options(engine="dm", object_amplitude_max=1.0)


@pytest.mark.parametrize("engine", ["ml", "gd"])
def test_the_default_run_is_minibatches_then_full_batch(small_pbtio3, client, engine):
    """10 iterations at the defaults are 7 in minibatches and 3 in full batch, bit for bit:
    the same as 7 minibatch iterations then 3 full-batch ones started from them."""
    ds = dp.open_dataset(small_pbtio3)
    kw = dict(engine=engine, slices=2, client=client, refine_probe=False)
    whole = dp.reconstruct(ds, iterations=10, **kw)
    first = dp.reconstruct(ds, iterations=7, minibatch_fraction=1.0, **kw)
    rest = dp.reconstruct(ds, iterations=3, batch_size=None, start=first, **kw)
    np.testing.assert_array_equal(whole.object.values, rest.object.values)
    np.testing.assert_array_equal(whole.cost.values[7:], rest.cost.values)
    full = dp.reconstruct(ds, iterations=10, batch_size=None, **kw)
    assert not np.array_equal(whole.object.values, full.object.values)


def test_the_amplitude_clip_keeps_the_phase():
    rng = np.random.default_rng(0)
    obj = (rng.uniform(0.2, 1.8, (2, 8, 8)) * np.exp(1j * rng.uniform(-3, 3, (2, 8, 8)))).astype(np.complex64)
    out = clip_amplitude(obj.copy(), 1.0)
    assert np.abs(out).max() <= 1 + 1e-6
    low = np.abs(obj) <= 1
    np.testing.assert_array_equal(out[low], obj[low])
    np.testing.assert_allclose(np.angle(out), np.angle(obj), atol=1e-6)
    assert engine_options(engine="ml", slices=2, slice_thickness_m=1e-10).amplitude_max() == 1.0
    assert engine_options(engine="ml", slices=1).amplitude_max() is None


def test_a_multislice_default_run_stays_passive(small_pbtio3):
    ds = dp.open_dataset(small_pbtio3)
    obj, _, _ = run_ml(prepare(ds, engine_options(engine="ml", iterations=6, slices=2)), load_patterns(ds))
    assert np.abs(obj).max() <= 1 + 1e-6
    obj, _, _ = run_ml(prepare(ds, engine_options(engine="ml", iterations=6, slices=2, object_amplitude_max=None)), load_patterns(ds))
    assert np.abs(obj).max() > 1 + 1e-4  # what the clip removes


def test_probe_steps_keep_the_modes_orthogonal_and_the_intensities():
    rng = np.random.default_rng(1)
    probe = (rng.normal(size=(3, 16, 16)) + 1j * rng.normal(size=(3, 16, 16))).astype(np.complex64)
    grad = (0.1 * (rng.normal(size=probe.shape) + 1j * rng.normal(size=probe.shape))).astype(np.complex64)
    illum = rng.uniform(0.5, 2, (16, 16)).astype(np.float32)
    new = probe_step(probe, grad, illum, 0.5, 0.1)
    gram = np.einsum("kyx,lyx->kl", new.conj(), new)
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-3 * np.abs(gram).max())
    power = np.real(np.diag(gram))
    assert np.all(np.diff(power) <= 0)  # by decreasing power
    # the same partially coherent beam as the plain step: same density matrix
    eps = 0.1 * illum.mean()
    plain = probe - 0.5 * grad / (2 * (illum + eps))
    density = lambda p: np.einsum("kyx,kab->yxab", p, p.conj())  # noqa: E731
    np.testing.assert_allclose(density(new), density(plain), atol=1e-3 * np.abs(density(plain)).max())


def test_every_engine_starts_from_the_same_motion_modes():
    ds = dp.simulate(kind="flyscan", scan=(6, 6), detector=32, probe_modes=3)
    ml = prepare(ds, engine_options(engine="ml", probe_modes=3, iterations=1)).probe
    dm = prepare(ds, engine_options(engine="dm", probe_modes=3, iterations=1)).probe
    np.testing.assert_array_equal(ml, dm)
    fractions = physics.orthogonalize_modes(ml)[1]
    assert fractions[0] < 0.95 and fractions[1] > 0.02  # blur modes, not one mode and crumbs


def test_gd_rounds_share_a_new_random_order_every_iteration():
    from daskptycho.tasks.tiles import round_group

    groups = [round_group(37, 4, r, (1, 0), 0, 5) for r in range(4)]
    np.testing.assert_array_equal(np.sort(np.concatenate(groups)), np.arange(37))  # a partition
    assert [g.size for g in groups] == [10, 9, 9, 9]  # the interleaved shares' sizes (the step's floor counts them)
    assert not np.array_equal(groups[0], round_group(37, 4, 0, (1, 0), 0, 6))  # the next iteration draws anew
    assert not np.array_equal(groups[0], round_group(37, 4, 0, (0, 1), 0, 5))  # and so does another tile
    np.testing.assert_array_equal(groups[2], round_group(37, 4, 2, (1, 0), 0, 5))  # replayable
