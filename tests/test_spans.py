"""Every task of a run falls under the span of its phase, on a real scheduler."""

from __future__ import annotations

import dask
import pytest

import daskptycho as dp
from daskptycho.keys import PHASES, phase_of


@pytest.mark.parametrize("key, phase", [
    (("grad", 3, 0, 1), "grad"), (("vfwd-strip", 0, 1, 2), "passes"), (("hbwd-strip", 4, 2, 0), "passes"), (("buffer", 0, 1, 1), "passes"),
    (("update", 1, 0, 0), "update"), (("load", 0, 1), "load"), (("cost", 2), "passes"),
    (("hve-step", 0, 1, 1), "grad"), (("hve-paste", 0, 1, 1), "passes"), (("dm-views", 0, 0, 1), "grad"),
    (("dm-sum", 0, 1, 0), "passes"), (("dm-object", 0), "update"), ("ml-iteration-12", "grad"),
    (("init", 0, 0), "load"), (("something-else", 0), None), ("finalize-abc", None),
])
def test_phase_of_keys(key, phase):
    assert phase_of(key) == phase


def _spans(dask_scheduler):
    """``{span name: set of task-group names}`` and the groups outside daskptycho spans."""
    ext = dask_scheduler.extensions["spans"]
    out = {}
    for sp in ext.spans.values():
        out.setdefault(sp.name, set()).update(g.name for g in sp.groups)
    return out


def _tasks_per_phase(dask_scheduler):
    """Number of tasks ever seen in each daskptycho phase span."""
    ext = dask_scheduler.extensions["spans"]
    return {sp.name[-1]: sum(sp.states.values()) for sp in ext.spans.values() if sp.name[0] == "daskptycho" and len(sp.name) == 2}


GD_GROUPS = {
    "load": {"load", "init"},
    "grad": {"grad", "tile-cost"},
    "passes": {"vfwd-strip", "vbwd-strip", "hfwd-strip", "hbwd-strip", "cost"},
    "update": {"update", "preview", "core", "nbytes"},
}


def test_gd_run_files_tasks_under_phase_spans(client, small_pbtio3):
    # the tile graph, each tile's task on its own (peer stages are filed under "grad")
    with dask.config.set({"daskptycho.schedule.exchange": "scheduler"}):
        res = dp.reconstruct(str(small_pbtio3), engine="gd", tiles=(2, 2), iterations=2, slices=2, client=client)
    assert res.cost.size == 2
    spans = client.run_on_scheduler(_spans)
    for phase in PHASES:
        groups = spans.get(("daskptycho", phase))
        assert groups, f"no span ('daskptycho', {phase!r}): {sorted(spans)}"
        # the phase's tasks all came, and no task of another phase; a group of no
        # phase is one a task of this phase submitted itself (it inherits the span:
        # reading the store on a worker computes its coordinates through the cluster)
        assert GD_GROUPS[phase] <= groups, (phase, groups)
        assert all(phase_of((g,)) in (phase, None) for g in groups), (phase, groups)
    # no task of the run fell outside its phase (only scattered inputs go to dask's default span)
    elsewhere = set().union(*(g for name, g in spans.items() if name[0] != "daskptycho"))
    assert not elsewhere & set().union(*GD_GROUPS.values())
    counts = client.run_on_scheduler(_tasks_per_phase)
    # 2x2 tiles, 2 iterations: 4 grads per iteration, 4 tile updates per iteration
    assert counts["grad"] >= 2 * 8 and counts["update"] >= 2 * 4 and counts["load"] >= 8
    # one run, one daskptycho span tree
    assert len([n for n in spans if n == ("daskptycho",)]) == 1


def test_ml_and_dm_runs_file_tasks_under_phase_spans(client, small_pbtio3):
    dp.reconstruct(str(small_pbtio3), engine="ml", iterations=2, slices=2, client=client)
    ds = dp.open_dataset(small_pbtio3)
    dp.reconstruct(ds.isel(slice=slice(0, 1)) if "slice" in ds.dims else ds, engine="dm", iterations=2, slices=1,
                   client=client, partitions=2)
    spans = client.run_on_scheduler(_spans)
    seen = set().union(*(g for name, g in spans.items() if name[0] == "daskptycho"))
    assert {"ml-iteration", "load", "init"} <= seen
    assert {"dm-views", "dm-sum", "dm-object", "dm-probe", "dm-crop"} <= seen
    for name, groups in spans.items():
        if name[0] == "daskptycho" and len(name) == 2:
            assert all(phase_of((g,)) in (name[1], None) for g in groups), (name, groups)
