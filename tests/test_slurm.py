"""Batch systems through dask-jobqueue: a real single-node SLURM runs the workers of a
``--cluster slurm --jobs 2`` reconstruction; the LSF (Summit-shaped) and PBS profiles of
cluster/jobqueue.yaml produce the job scripts they should (not submitted)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dask.config
import numpy as np
import pytest

import daskptycho as dp
from daskptycho.cluster import ClusterError, jobqueue_cluster, jobqueue_profiles

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}


def _node_ready():
    if not shutil.which("sinfo"):
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and any(s.strip() in ("idle", "mix", "alloc") for s in r.stdout.split())


@pytest.fixture(scope="module")
def slurm():
    """The running SLURM. The tests never install or start one: that is system set-up, done by
    ``.ci/run`` (``cluster/ci/slurm-up.sh`` before ``make test``, ``slurm-down.sh`` after)."""
    if not _node_ready():
        pytest.skip("no running SLURM: start a single-node one with 'sudo bash cluster/ci/slurm-up.sh' "
                    "(what 'bash .ci/run' does), then run the tests again")
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"^JobCompLoc\s*=\s*(\S+)", conf, re.M)
    jobcomp = m.group(1) if m and re.search(r"^JobCompType\s*=\s*jobcomp/filetxt", conf, re.M) else None
    return {"jobcomp": jobcomp}


def _jobcomp_records(path, workdir):
    """The jobcomp/filetxt records (one dict per finished job) whose WorkDir is ``workdir``."""
    if not path or not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            rec = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if rec.get("WorkDir") == str(workdir):
                out.append(rec)
    return out


def test_reconstruct_with_slurm_jobs_matches_a_local_run(slurm, small_pbtio3, tmp_path):
    out = tmp_path / "slurm.zarr"
    opts = ["--engine", "gd", "--tiles", "2x2", "--slices", "2", "--iterations", "3"]
    exe = shutil.which("daskptycho", path=os.path.dirname(sys.executable)) or "daskptycho"
    # a directory of its own: SLURM records it as the jobs' WorkDir, which tells this run's jobs from any other
    workdir = tmp_path / "submit"
    workdir.mkdir()
    t0 = time.time()
    r = subprocess.run([exe, "reconstruct", str(small_pbtio3), "--out", str(out), *opts, "--cluster", "slurm", "--jobs", "2", "--quiet"],
                       cwd=workdir, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    # the witness: SLURM's job-completion log holds this run's two worker jobs (cancelled
    # by dask-jobqueue when the run closed its cluster); completion records land once the
    # jobs have been killed, so wait for them
    records = []
    for _ in range(120):
        records = _jobcomp_records(slurm["jobcomp"], workdir)
        if len(records) >= 2:
            break
        time.sleep(0.5)
    if slurm["jobcomp"] is None:
        pytest.fail("this SLURM has no jobcomp/filetxt log: start it with cluster/ci/slurm-up.sh")
    assert len(records) == 2, records
    assert {rec["Name"] for rec in records} == {jobqueue_profiles()["slurm"]["name"]}
    assert all(rec["JobState"] in ("CANCELLED", "COMPLETED") and rec["NodeCnt"] == "1" for rec in records), records
    assert len({rec["JobId"] for rec in records}) == 2
    submitted = [time.mktime(time.strptime(rec["SubmitTime"], "%Y-%m-%dT%H:%M:%S")) for rec in records]
    assert all(s >= int(t0) - 1 for s in submitted)

    # the same options on an embedded 2-worker cluster give the same reconstruction
    ds = dp.open_dataset(small_pbtio3)
    local = dp.reconstruct(ds, engine="gd", tiles=(2, 2), slices=2, iterations=3, cluster="local", workers=2)
    remote = dp.open_result(out)
    a, b = remote.object.values, local.object.values
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
    np.testing.assert_allclose(remote.cost.values, local.cost.values, rtol=1e-5)


def test_slurm_workers_with_tls_certificates(slurm, tmp_path):
    """Batch-job workers are given the certificate files on their command line and join over tls://."""
    from test_tls import _write_certificates  # tests/ is on sys.path (pytest's rootdir-relative import)

    with dask.config.set(_write_certificates(tmp_path)):
        with pytest.raises(dp.OptionsError, match="certificate files"), dask.config.set({"daskptycho.cluster.tls-cert": None,
                                                                                        "daskptycho.cluster.tls-ca-file": None,
                                                                                        "daskptycho.cluster.tls-key": None}):
            dp.connect("slurm", jobs=1, tls=True)
        with dp.connect("slurm", jobs=1, tls=True) as conn:
            assert conn.scheduler_address.startswith("tls://127.0.0.1:")
            (worker,) = conn.client.nthreads()
            assert worker.startswith("tls://127.0.0.1:")
            assert len(conn.job_ids) == 1
            script = conn.cluster.job_script()
            assert f"--tls-cert {tmp_path / 'cert.pem'}" in script and "--protocol tls://" in script
            assert conn.client.submit(sum, [2, 3], pure=False).result() == 5


def test_slurm_errors_name_the_batch_system(slurm, tmp_path):
    """A job no node can run is refused up front; a job that does not start in time gives a
    timeout naming SLURM and the job, which is then cancelled (nothing left queued)."""
    profiles = tmp_path / "jobqueue.yaml"
    profiles.write_text(
        "jobqueue:\n"
        "  slurm:\n    name: daskptycho-too-big\n    cores: 1\n    memory: 100TiB\n    interface: lo\n"
        "  slurm-later:\n    system: slurm\n    name: daskptycho-later\n    cores: 1\n    memory: 1GiB\n    interface: lo\n"
        "    job-extra-directives: ['--begin=now+3600', '--output=/dev/null']\n")
    with dask.config.set({"daskptycho.cluster.jobqueue-file": str(profiles), "daskptycho.cluster.worker-timeout": 3}):
        with pytest.raises(ClusterError, match=r"cluster='slurm': SLURM refuses the worker job .*edit profile 'slurm'"):
            dp.connect("slurm", jobs=1)
        with pytest.raises(ClusterError, match=r"0 of 1 SLURM workers joined within 3 s \(job ids: \d+\)") as e:
            dp.connect("slurm-later", jobs=1)
    job = re.search(r"job ids: (\d+)", str(e.value)).group(1)
    for _ in range(40):
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if state in ("", "CANCELLED"):
            break
        time.sleep(0.25)
    assert state in ("", "CANCELLED"), state


# ----------------------------------------------------------------------------- job scripts, not submitted


def test_slurm_ci_profile_job_script():
    with jobqueue_cluster("slurm", scheduler_options=LOOPBACK) as cl:
        s = cl.job_script()
    assert "#SBATCH -J daskptycho-worker" in s and "#SBATCH --cpus-per-task=1" in s and "#SBATCH --mem=2G" in s
    assert f"{sys.executable} -m distributed.cli.dask_worker" in s  # the running interpreter: its venv holds daskptycho
    assert "--local-directory /tmp" in s and "--interface lo" in s and "--nthreads 1" in s


def test_slurm_gpu_profile_runs_dask_cuda_workers():
    with jobqueue_cluster("slurm-gpu", scheduler_options=LOOPBACK) as cl:
        s = cl.job_script()
    assert "#SBATCH --gres=gpu:4" in s and "#SBATCH -p gpu" in s
    assert "-m dask_cuda.cli worker" in s and "--protocol ucx" in s
    assert "--nworkers" not in s  # dask-cuda starts one worker per GPU itself


def test_lsf_profile_is_shaped_like_summit():
    with jobqueue_cluster("lsf", scheduler_options=LOOPBACK) as cl:
        s = cl.job_script()
    lines = s.splitlines()
    bsub = [ln for ln in lines if ln.startswith("#BSUB")]
    assert "#BSUB -nnodes 1" in bsub and '#BSUB -P "ABC123"' in bsub and "#BSUB -W 01:00" in bsub
    assert "#BSUB -alloc_flags gpumps" in bsub
    # whole nodes: no per-slot core, memory or span requests
    assert not any(re.match(r"#BSUB -(n|M|R) ", ln) for ln in bsub), bsub
    (cmd,) = [ln for ln in lines if "dask_cuda.cli worker" in ln]
    # jsrun: 6 resource sets, each 1 GPU, 7 cores, 1 task -> 6 GPUs per node, one worker each
    assert cmd.startswith("jsrun ") and " -n 6 " in cmd and " -g 1 " in cmd and " -c 7 " in cmd and " -a 1 " in cmd
    assert "--protocol ucx" in cmd and "--interface ib0" in cmd and "--nthreads 7" in cmd
    assert cl._dummy_job.worker_processes == 6


def test_pbs_profile_asks_for_gpus():
    with jobqueue_cluster("pbs", scheduler_options=LOOPBACK) as cl:
        s = cl.job_script()
    assert "#PBS -l select=1:ncpus=32:ngpus=4:mem=256GB" in s and "#PBS -q gpu" in s and "#PBS -l walltime=01:00:00" in s
    assert "-m dask_cuda.cli worker" in s and "--protocol ucx" in s and "--nthreads 8" in s
