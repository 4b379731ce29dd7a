"""A gradient-decomposition run over UCX (distributed-ucxx, loopback TCP transport) gives
the same result as over plain TCP."""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest

import daskptycho as dp


def _ucxx_reason():
    try:
        importlib.import_module("distributed_ucxx")
    except Exception as e:  # ImportError, or its native UCX libraries failing to load
        return f"distributed-ucxx cannot be imported ({type(e).__name__}: {e}); pip install distributed-ucxx-cu12"
    return None


pytestmark = pytest.mark.skipif(_ucxx_reason() is not None, reason=_ucxx_reason() or "")


def test_gd_over_ucx_equals_tcp(small_pbtio3, monkeypatch):
    # connect('ucx') sets these only when unset; setenv first so that monkeypatch
    # restores them (unset) after the test instead of leaking connect's values
    for var in ("UCX_TLS", "UCX_WARN_UNUSED_ENV_VARS"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    kw = dict(engine="gd", tiles=(2, 2), iterations=2, slices=2, workers=2)
    with dp.connect("ucx", workers=2) as conn:
        assert conn.scheduler_address.startswith("ucx://127.0.0.1:")
        workers = conn.client.nthreads()
        assert len(workers) == 2 and all(w.startswith("ucx://127.0.0.1:") for w in workers)
        assert os.environ["UCX_TLS"] == "tcp"
        over_ucx = dp.reconstruct(small_pbtio3, client=conn.client, **kw)
    over_tcp = dp.reconstruct(small_pbtio3, cluster="local", **kw)
    # the tiles really were spread over both UCX workers, so strips crossed UCX
    assert len(set(json.loads(over_ucx.attrs["memory"])["tile_workers"].values())) == 2
    a, b = over_ucx.object.values, over_tcp.object.values
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
    np.testing.assert_allclose(over_ucx.cost.values, over_tcp.cost.values, rtol=1e-5)
    assert over_tcp.cost.values[-1] < over_tcp.cost.values[0]
