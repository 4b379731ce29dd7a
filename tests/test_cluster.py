"""daskptycho.connect: a loopback-only embedded cluster, attaching by address and by
scheduler file (never closing what it did not start), and the errors of bad specs."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import dask.config
import psutil
import pytest

import daskptycho as dp
from daskptycho.backend import gpu_available as _gpu_present
from daskptycho.cli import main
from daskptycho.cluster import ClusterError
from daskptycho.errors import DeviceError, OptionsError


def _listening(pids):
    """{port: ip} of the TCP sockets the processes ``pids`` listen on."""
    out = {}
    for pid in pids:
        for c in psutil.Process(pid).net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                out[c.laddr.port] = c.laddr.ip
    return out


def test_local_cluster_listens_on_loopback_only_and_others_attach_without_closing_it(tmp_path):
    with dp.connect("local", workers=2) as conn:
        client = conn.client
        assert conn.cluster is not None and conn.spec == "local" and conn.device == "cpu"
        sched = urlparse(conn.scheduler_address)
        dash = urlparse(conn.dashboard_link)
        assert sched.scheme == "tcp" and sched.hostname == "127.0.0.1"
        assert dash.hostname == "127.0.0.1"
        workers = client.nthreads()
        assert len(workers) == 2
        assert all(urlparse(w).hostname == "127.0.0.1" for w in workers)
        assert all(n == 1 for n in workers.values())
        # what the operating system says: the scheduler, dashboard, nannies and
        # workers accept connections on 127.0.0.1 only, never on 0.0.0.0
        me = psutil.Process()
        ports = _listening([me.pid] + [p.pid for p in me.children(recursive=True)])
        assert ports[sched.port] == "127.0.0.1" and ports[dash.port] == "127.0.0.1"
        for w in workers:
            assert ports[urlparse(w).port] == "127.0.0.1"
        worker_pids = set(client.run(os.getpid).values())
        nanny_pids = {psutil.Process(p).ppid() for p in worker_pids}
        listening = _listening(worker_pids | nanny_pids)
        assert len(listening) >= 4 and set(listening.values()) == {"127.0.0.1"}, listening

        # attach by address: a second client, no cluster of its own; closing it leaves the cluster running
        with dp.connect(conn.scheduler_address) as other:
            assert other.cluster is None
            assert other.client.submit(sum, [1, 2, 3], pure=False).result() == 6
        assert client.submit(sum, [4, 5], pure=False).result() == 9
        assert len(client.nthreads()) == 2

        # attach by scheduler file, as written by the scheduler's own format
        sf = tmp_path / "scheduler.json"
        client.write_scheduler_file(str(sf))
        with dp.connect(scheduler_file=str(sf)) as other:
            assert other.cluster is None and other.scheduler_address == conn.scheduler_address
            assert sorted(other.client.nthreads()) == sorted(workers)
        assert client.submit(sum, [1, 1], pure=False).result() == 2


def test_bad_specs_give_one_clear_error(tmp_path):
    with pytest.raises(OptionsError) as e:
        dp.connect("nonsense")
    msg = str(e.value)
    assert "cluster" in msg and "'nonsense'" in msg
    for choice in ("local", "cuda", "ucx", "slurm", "lsf", "pbs", "tcp://"):
        assert choice in msg
    with pytest.raises(OptionsError, match="scheduler_file"):
        dp.connect(scheduler_file=str(tmp_path / "missing.json"))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json")
    with pytest.raises(OptionsError, match="not a Dask scheduler file"):
        dp.connect(scheduler_file=str(garbage))
    with pytest.raises(OptionsError, match="jobs"):
        dp.connect("slurm", jobs=0)
    # nobody listens on port 1 of loopback: a quick, clear error
    with dask.config.set({"daskptycho.cluster.connect-timeout": 2}), pytest.raises(ClusterError, match="cannot reach the scheduler"):
        dp.connect("tcp://127.0.0.1:1")




@pytest.mark.skipif(_gpu_present(), reason="a GPU is present: the no-GPU error cannot be seen here")
def test_cuda_without_gpu_says_so_and_suggests_local():
    with pytest.raises(DeviceError) as e:
        dp.connect("cuda")
    msg = str(e.value)
    assert "no usable GPU" in msg and "cluster='local'" in msg
    with pytest.raises(OptionsError, match="device"):
        dp.connect("cuda", device="cpu")


@pytest.mark.parametrize("spec, words", [("nonsense", ["--cluster", "'nonsense'", "local"]),
                                         ("cuda", ["GPU", "--cluster local"] if not _gpu_present() else None)])
def test_cli_bad_cluster_exits_2_with_one_line(small_pbtio3, tmp_path, capsys, spec, words):
    if words is None:
        pytest.skip("a GPU is present")
    out = tmp_path / "r.zarr"
    rc = main(["reconstruct", str(small_pbtio3), "--out", str(out), "--iterations", "1", "--cluster", spec, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("daskptycho: error:"), err
    for w in words:
        assert w in err[0]
    assert not out.exists()


def test_reconstruct_refuses_a_bad_cluster_before_reading_the_dataset(small_pbtio3, monkeypatch):
    """From Python too, what connect would refuse is refused before the dataset is read
    (prepare streams every pattern for the mean counts) or a cluster starts."""
    import daskptycho.engines as engines

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was read before the cluster options were checked")

    monkeypatch.setattr(engines, "prepare", refuse)
    ds = dp.open_dataset(small_pbtio3)
    with pytest.raises(OptionsError, match="cluster"):
        dp.reconstruct(ds, engine="ml", iterations=1, cluster="nonsense")
    with pytest.raises(OptionsError, match="jobs"):
        dp.reconstruct(ds, engine="gd", iterations=1, cluster="slurm", cluster_options={"jobs": 0})


def _periods(server):
    """The periods (ms) of a server's system monitor, event-loop check and (worker) stack sampler."""
    pcs = server.periodic_callbacks
    return (pcs["monitor"].callback_time, pcs["tick"].callback_time,
            pcs["profile"].callback_time if "profile" in pcs else None)


@pytest.mark.parametrize("setting, scheduler, worker", [
    (None, (2000, 100, None), (2000, 100, 100)),           # quiet, the default
    ("default", (500, 20, None), (500, 20, 10)),             # distributed's own
])
def test_a_cluster_started_here_does_distributeds_background_work_as_configured(setting, scheduler, worker):
    # every process of an embedded cluster is made under the setting, the workers' own
    # processes included; a cluster started afterwards without it gets distributed's again
    from distributed import Client

    from daskptycho.cluster import local_cluster

    cfg = {} if setting is None else {"daskptycho.cluster.background": setting}
    with dask.config.set(cfg), local_cluster(1) as cluster, Client(cluster) as client:
        assert client.run_on_scheduler(lambda dask_scheduler: _periods(dask_scheduler)) == scheduler
        assert list(client.run(lambda dask_worker: _periods(dask_worker)).values()) == [worker]
        assert [_periods(n) for n in cluster.workers.values()] == [scheduler]  # the nannies, in this process
    assert dask.config.get("distributed.admin.tick.interval") == "20ms"  # this process's settings are left as they were


def test_a_bad_background_setting_names_the_key():
    from daskptycho.cluster import local_cluster

    with dask.config.set({"daskptycho.cluster.background": "silent"}), pytest.raises(OptionsError, match="cluster.background"):
        local_cluster(1)


def _affinities():
    """This process's threads' CPU sets."""
    return {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores and Linux affinity")
def test_local_workers_each_run_on_their_own_share_of_the_cores():
    # every thread of each worker process on its share; the shares split this process's
    # cores; more workers than cores, or the setting off, leaves them where they were
    from distributed import Client

    from daskptycho.cluster import core_shares, local_cluster

    cpus = sorted(os.sched_getaffinity(0))
    shares = core_shares(2)
    assert sorted(c for v in shares.values() for c in v) == cpus and all(shares.values())
    with local_cluster(2) as cluster, Client(cluster) as client:
        got = client.run(_affinities)
        names = client.run(lambda dask_worker: dask_worker.name)
        for address, threads in got.items():
            assert set(map(tuple, threads.values())) == {tuple(shares[int(names[address])])}
            # a task thread the worker starts later inherits its share
            f = client.submit(lambda: sorted(os.sched_getaffinity(0)), workers=[address], pure=False)
            assert f.result(timeout=60) == shares[int(names[address])]
        assert sorted(os.sched_getaffinity(0)) == cpus  # this process is left as it was
    assert core_shares(len(cpus) + 1) is None
    with dask.config.set({"daskptycho.cluster.pin-workers": False}):
        assert core_shares(2) is None
        with local_cluster(2) as cluster, Client(cluster) as client:
            assert all(set(map(tuple, t.values())) == {tuple(cpus)} for t in client.run(_affinities).values())
    with dask.config.set({"daskptycho.cluster.pin-workers": "sometimes"}), pytest.raises(OptionsError, match="pin-workers"):
        core_shares(2)
