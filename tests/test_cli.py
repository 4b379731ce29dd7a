"""The command line: every subcommand for real, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import daskptycho as dp


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "daskptycho", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("cmd", ["simulate", "info", "reconstruct", "view"])
def test_help(cmd):
    p = run(cmd, "--help")
    assert p.returncode == 0 and "usage: daskptycho " + cmd in p.stdout


def test_simulate_info_reconstruct_view(tmp_path):
    store = tmp_path / "d.zarr"
    p = run("simulate", store, "--scan", "6x6", "--detector", "32", "--slices", "2")
    assert p.returncode == 0, p.stderr
    p = run("info", store)
    assert p.returncode == 0, p.stderr
    ds = dp.open_dataset(store)
    assert "radiation: electron" in p.stdout and f"{ds.attrs['wavelength_m']:.6g}" in p.stdout
    assert "patterns: 36 of 32 x 32" in p.stdout
    out = tmp_path / "r.zarr"
    p = run("reconstruct", store, "--engine", "ml", "--slices", "2", "--iterations", "4", "--workers", "1",
            "--out", out, "--report", tmp_path / "report.html", "--timing", tmp_path / "t.json")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("cost") >= 4  # a progress line per iteration with its cost
    res = dp.open_result(out)
    assert res.sizes["iteration"] == 4 and res.attrs["input_store"] == str(store.resolve())
    timing = json.loads((tmp_path / "t.json").read_text())
    assert len(timing["iteration_s"]) == 4 and timing["iteration_s_median"] > 0
    # the steady state: the mean after the first two iterations (the start, the pipelined second)
    assert timing["iteration_s_steady"] == pytest.approx(sum(timing["iteration_s"][2:]) / 2)
    html = (tmp_path / "report.html").read_text()
    assert "Dask Performance Report" in html and "Task Stream" in html
    # refusing to overwrite, then overwriting
    p = run("reconstruct", store, "--engine", "ml", "--iterations", "1", "--out", out)
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    p = run("view", out, "--out", tmp_path / "png", "--truth", store)
    assert p.returncode == 0, p.stderr
    assert "Pearson r" in p.stdout
    pngs = sorted(os.listdir(tmp_path / "png"))
    assert {"object_phase.png", "object_amplitude.png", "probe_modes.png", "cost.png", "truth_comparison.png"} <= set(pngs)
    for name in pngs:
        assert (tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["info", "/nonexistent/store.zarr"], "store"),
        (["reconstruct", "/nonexistent/store.zarr", "--out", "x.zarr"], "store"),
        (["simulate", "{tmp}/s.zarr", "--scan", "0x4"], "--scan"),
        (["simulate", "{tmp}/s.zarr", "--detector", "7"], "detector"),
        (["reconstruct", "{store}", "--engine", "nope", "--out", "{tmp}/o.zarr"], "engine"),
        (["reconstruct", "{store}", "--iterations", "0", "--out", "{tmp}/o.zarr"], "--iterations"),
        (["view", "{store}", "--out", "{tmp}/png"], "result"),
    ],
)
def test_errors_are_one_line_with_status_2(args, needle, tmp_path, small_pbtio3):
    args = [a.format(tmp=tmp_path, store=small_pbtio3) for a in args]
    p = run(*args, cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr
    assert needle in lines[-1]
    assert len([ln for ln in lines if "error" in ln]) == 1


def test_cli_does_not_modify_its_input(small_pbtio3, tmp_path):
    def digest(path):
        import hashlib

        h = hashlib.sha256()
        for root, _, files in sorted(os.walk(path)):
            for f in sorted(files):
                h.update(f.encode())
                with open(os.path.join(root, f), "rb") as fh:
                    h.update(fh.read())
        return h.hexdigest()

    before = digest(small_pbtio3)
    assert run("info", small_pbtio3).returncode == 0
    assert run("reconstruct", small_pbtio3, "--iterations", "1", "--slices", "2", "--workers", "1", "--out", tmp_path / "o.zarr").returncode == 0
    assert digest(small_pbtio3) == before
    np.testing.assert_equal(dp.open_result(tmp_path / "o.zarr").sizes["slice"], 2)


def test_simulate_and_import_refuse_an_existing_output_before_doing_any_work(tmp_path, capsys):
    from daskptycho.cli import main

    out = tmp_path / "taken.zarr"
    out.mkdir()
    (out / "keep").write_text("mine")
    # the input does not even exist: the refusal must come first, before reading or simulating
    assert main(["import", str(tmp_path / "missing.npz"), str(out)]) == 2
    assert main(["simulate", str(out), "--scan", "64x64", "--detector", "256", "--slices", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("exists: pass --overwrite" in line for line in err)
    assert (out / "keep").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep"]


def test_steady_iteration_time_is_the_mean_after_the_start():
    from daskptycho.metrics import steady_iteration_s

    # a pipelined run: the first interval carries the start, the second cost arrives at once,
    # then bursts; the rate is the mean of what follows
    assert steady_iteration_s([4.4, 0.02, 1.16, 0.005, 0.6, 0.55]) == pytest.approx((1.16 + 0.005 + 0.6 + 0.55) / 4)
    assert steady_iteration_s([3.0, 0.5]) == 0.5 and steady_iteration_s([2.0]) == 2.0
    with pytest.raises(ValueError):
        steady_iteration_s([])
