"""``daskptycho.cluster.message-interval``: the scheduler-worker message batching a run sets."""

from __future__ import annotations

import dask
import numpy as np
import pytest

import daskptycho as dp
from daskptycho import latency

# distributed's own intervals (distributed.batched.BatchedSend, fixed in scheduler.py and worker.py)
SCHEDULER_DEFAULT_S, WORKER_DEFAULT_S = 0.005, 0.002


@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), ("AUTO", "auto"), ("default", None), (None, None), ("0ms", 0.0), ("1ms", 0.001), (0, 0.0),
    ("250us", 0.00025), (2, 0.002),  # a bare number is milliseconds
])
def test_settings_parse(value, expected):
    assert latency.parse_interval(value) == expected


@pytest.mark.parametrize("bad", ["soon", "-1ms", "5s", [1]])
def test_bad_settings_name_the_key(bad):
    with pytest.raises(dp.OptionsError) as info:
        latency.parse_interval(bad)
    assert info.value.option == latency.KEY and "0ms" in str(info.value)


def test_a_bad_setting_fails_before_any_cluster_starts(small_pbtio3, monkeypatch):
    from daskptycho import cluster

    started = []
    monkeypatch.setattr(cluster, "local_cluster", lambda *a, **k: started.append(a) or pytest.fail("a cluster started"))
    with dask.config.set({latency.KEY: "soon"}), pytest.raises(dp.OptionsError, match="message-interval"):
        dp.reconstruct(str(small_pbtio3), engine="ml", iterations=1, slices=2, workers=1)
    assert started == []


def _gd(store, client):
    return dp.reconstruct(str(store), engine="gd", tiles=(2, 2), iterations=2, slices=2, client=client)


def test_a_run_on_a_cluster_of_this_process_sends_without_delay_and_computes_the_same(small_pbtio3):
    from distributed import Client

    from daskptycho.cluster import local_cluster

    with local_cluster(2, memory_limit="1GiB") as cluster, Client(cluster) as c:
        before = latency.intervals(c)
        assert set(before["scheduler"].values()) == {SCHEDULER_DEFAULT_S}
        assert set(before["workers"].values()) == {WORKER_DEFAULT_S}
        with dask.config.set({latency.KEY: "default"}):
            ref = _gd(small_pbtio3, c)
        assert latency.intervals(c) == before                     # "default" leaves distributed's own
        res = _gd(small_pbtio3, c)                                # "auto": no batching delay
        now = latency.intervals(c)
        assert set(now["scheduler"].values()) == {0.0} and set(now["workers"].values()) == {0.0}
        # a worker that joins later (a restarted one, a new batch job) gets it from the plugins
        cluster.scale(3)
        c.wait_for_workers(3)
        later = latency.intervals(c)
        assert len(later["workers"]) == 3 and set(later["scheduler"].values()) == {0.0} and set(later["workers"].values()) == {0.0}
    # when messages leave changes, what they say does not: the same bits
    np.testing.assert_array_equal(res.object.values, ref.object.values)
    np.testing.assert_array_equal(res.cost.values, ref.cost.values)


def test_a_scheduler_reached_by_address_is_left_alone_unless_asked(small_pbtio3):
    from distributed import Client

    from daskptycho.cluster import local_cluster

    with local_cluster(1, memory_limit="1GiB") as cluster:
        with Client(cluster.scheduler_address) as c:
            assert c.cluster is None
            assert latency.apply(c) is None                     # auto: not ours to tune
            assert set(latency.intervals(c)["scheduler"].values()) == {SCHEDULER_DEFAULT_S}
            assert latency.apply(c, "1ms") == 0.001
            assert latency.apply(c, "1ms") == 0.001             # registering again is a no-op
            got = latency.intervals(c)
            assert set(got["scheduler"].values()) == {0.001} and set(got["workers"].values()) == {0.001}
