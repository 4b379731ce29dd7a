"""The command line: every subcommand for real, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import daskptycho as dp
from daskptycho.metrics import BURST_GAP, steady_iteration_s


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
    err = p.stderr.splitlines()
    assert len([ln for ln in err if ln.startswith("iteration ")]) == 4  # a progress line per iteration with its cost
    # something at once, before the cluster's seconds of start-up: its first line, then the live page, then iterations
    assert err[0] == "daskptycho: starting 1 worker (LocalCluster, TCP on 127.0.0.1) ...", err
    live = next(i for i, ln in enumerate(err) if ln.startswith("daskptycho: live reconstruction page: http://127.0.0.1:"))
    assert 0 < live < next(i for i, ln in enumerate(err) if ln.startswith("iteration "))
    res = dp.open_result(out)
    assert res.sizes["iteration"] == 4 and res.attrs["input_store"] == str(store.resolve())
    timing = json.loads((tmp_path / "t.json").read_text())
    # the headline: the steady-state seconds per iteration (the mean interval after the start and the
    # pipelined second); the raw intervals between the costs' arrivals under their own name
    intervals = timing["cost_arrival_intervals_s"]
    assert len(intervals) == 4 and timing["iterations"] == 4 and all(v > 0 for v in intervals)
    assert timing["iteration_s"] == pytest.approx(steady_iteration_s(intervals)) == pytest.approx(sum(intervals[2:]) / 2)
    assert not {"iteration_s_median", "iteration_s_steady"} & set(timing)
    # ... and the same figure at the end of the run, one line
    steady = [ln for ln in err if "s per iteration in the steady state" in ln]
    assert len(steady) == 1 and steady[0].startswith(f"daskptycho: {timing['iteration_s']:.4g} s per iteration"), err
    html = (tmp_path / "report.html").read_text()
    assert "Dask Performance Report" in html and "Task Stream" in html
    # refusing to overwrite, then overwriting
    p = run("reconstruct", store, "--engine", "ml", "--iterations", "1", "--out", out)
    assert p.returncode == 2 and "pass --overwrite to replace it (or --resume" in p.stderr and "Traceback" not in p.stderr
    png = tmp_path / "png"
    p = run("view", out, "--out", png, "--truth", store)
    assert p.returncode == 0, p.stderr
    assert "Pearson r" in p.stdout
    pngs = sorted(os.listdir(png))
    assert {"object_phase.png", "object_amplitude.png", "probe_modes.png", "cost.png", "truth_comparison.png"} <= set(pngs)
    for name in pngs:
        assert (png / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # view again: the PNGs are refused before anything is drawn, then replaced with --overwrite
    (png / "cost.png").write_bytes(b"an earlier view's")
    before = {name: (png / name).read_bytes() for name in pngs}
    p = run("view", out, "--out", png)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert str(png / "object_phase.png") in lines[0] and "--overwrite" in lines[0] and "overwrite=True" not in lines[0]
    assert {name: (png / name).read_bytes() for name in pngs} == before
    p = run("view", out, "--out", png, "--overwrite")
    assert p.returncode == 0, p.stderr
    assert (png / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_a_peer_block_runs_steady_time_starts_where_its_first_block_ends(small_pbtio3, tmp_path):
    # gd on 2 workers: 10 iterations in peer blocks 1-7 (the minibatches) and 8-10; the
    # costs of a block arrive together, so the steady state is iterations 8-10, measured
    # from the arrival of the first block's last cost
    from daskptycho.engines import engine_options
    from daskptycho.engines.gd import block_ends

    assert block_ends(10, 16, engine_options(iterations=10).minibatch_iterations()) == [6, 9]
    p = run("reconstruct", small_pbtio3, "--slices", "2", "--iterations", "10", "--workers", "2",
            "--out", tmp_path / "r.zarr", "--timing", tmp_path / "t.json")
    assert p.returncode == 0, p.stderr
    res = dp.open_result(tmp_path / "r.zarr")
    assert res.attrs["engine"] == "gd" and json.loads(res.attrs["peer_block_ends"]) == [6, 9]
    timing = json.loads((tmp_path / "t.json").read_text())
    intervals = timing["cost_arrival_intervals_s"]
    if intervals[7] > BURST_GAP * sum(intervals[1:]) / 9:
        assert timing["iteration_s"] == pytest.approx(sum(intervals[7:]) / 3)
        assert "iterations 8-10 of 10" in timing["iteration_s_definition"]
        assert "s per iteration in the steady state (iterations 8-10 of 10;" in p.stderr, p.stderr
    else:  # the client fetched both blocks' costs at once (a busy machine): nothing steady to measure
        assert timing["iteration_s"] == pytest.approx(sum(intervals) / 10)
        assert timing["iteration_s_definition"].startswith("no steady state")
        assert "(no steady state:" in p.stderr, p.stderr


def test_steady_iteration_time_is_the_rate_between_the_ends_of_bursts():
    from daskptycho.metrics import steady_iteration_s, steady_span

    # a pipelined run: the first interval carries the start, the second cost arrives at once,
    # then bursts; the rate is the mean of what follows
    assert steady_iteration_s([4.4, 0.02, 1.16, 0.005, 0.6, 0.55]) == pytest.approx((1.16 + 0.005 + 0.6 + 0.55) / 4)
    # too few for a steady span: the whole run's mean, start included
    assert steady_iteration_s([3.0, 0.5]) == 1.75 and steady_iteration_s([2.0]) == 2.0
    # peer blocks: iterations 1-16 arrive together after the start, then 17-35 and 36-50, each
    # block's costs within milliseconds of each other; the span runs from the end of the first
    # block to the last cost, not from the second cost (which would count 14 iterations as free)
    t_it, gap = 0.025, 0.0003
    blocks = [(0, 16), (16, 35), (35, 50)]
    ends, t = [], 2.9
    for lo, hi in blocks[1:]:
        t += (hi - lo) * t_it
        ends.append(t)
    stamps = [2.9 + gap * k for k in range(16)]
    for (lo, hi), end in zip(blocks[1:], ends):
        stamps += [end + gap * k for k in range(hi - lo)]
    intervals = [stamps[0]] + [b - a for a, b in zip(stamps, stamps[1:])]
    # the groups given (a run's peer_block_ends, as indices): the span runs from the end of
    # the first block to the last cost
    ends = [15, 34, 49]
    assert steady_span(intervals, burst_ends=ends) == (15, 49)
    assert steady_iteration_s(intervals, burst_ends=ends) == pytest.approx((stamps[49] - stamps[15]) / 34)
    # within 2% of the true rate (the last block's own spread of arrivals aside), where the
    # mean after the second cost, what the groups' ends mend, was 30% fast
    assert steady_iteration_s(intervals, burst_ends=ends) == pytest.approx(t_it, rel=0.02)
    assert steady_iteration_s(intervals) == pytest.approx(sum(intervals[2:]) / 48) and sum(intervals[2:]) / 48 < 0.75 * t_it
    # a client that fetched the first three blocks' costs together (one worker sharing the
    # cores with it): the ends of the first two are no boundaries, the span starts at the
    # third's; starting at the first's would count 32 iterations as free (3x fast)
    blocks = [(0, 16), (16, 32), (32, 48), (48, 64)]
    stamps = [2.9 + 48 * t_it - gap * (47 - k) for k in range(48)] + [2.9 + 64 * t_it - gap * (15 - k) for k in range(16)]
    intervals = [stamps[0]] + [b - a for a, b in zip(stamps, stamps[1:])]
    ends = [hi - 1 for _, hi in blocks]
    assert steady_span(intervals, burst_ends=ends) == (47, 63)
    assert steady_iteration_s(intervals, burst_ends=ends) == pytest.approx(t_it)
    assert (stamps[63] - stamps[15]) / 48 < 0.4 * t_it
    # every iteration after the start in one group: no steady span, and no rate made of
    # the milliseconds between one group's costs: the whole mean, start included
    assert steady_span([3.0] + [0.0002] * 9, burst_ends=[9]) is None
    assert steady_iteration_s([3.0] + [0.0002] * 9, burst_ends=[9]) == pytest.approx((3.0 + 0.0018) / 10)
    with pytest.raises(ValueError):
        steady_iteration_s([])


# --------------------------------------------------------------------------- options are checked before anything starts

def _no_cluster(monkeypatch):
    """Make starting or reaching a cluster fail the test: connect() is the only way the
    engines get one, LocalCluster the only way an embedded one starts."""
    import distributed

    import daskptycho.cluster
    import daskptycho.engines.driver

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started before the options were checked")

    monkeypatch.setattr(daskptycho.cluster, "connect", refuse)
    monkeypatch.setattr(daskptycho.engines.driver, "connect", refuse)
    monkeypatch.setattr(distributed, "LocalCluster", refuse)


def _gpu_usable():
    from daskptycho.backend import gpu_available

    return gpu_available()


BAD_BEFORE_START = [
    (["--engine", "dm", "--slices", "4"], "--slices"),
    (["--engine", "ml", "--tiles", "3x3"], "--tiles"),
    (["--engine", "hve", "--refine-probe"], "--refine-probe"),
    (["--engine", "gd", "--partitions", "2"], "--partitions"),
    (["--engine", "ml", "--probe-modes", "auto"], "--probe-modes"),
    (["--engine", "dm", "--batch-size", "4"], "--batch-size"),
    (["--batch-size", "half"], "--batch-size"),
    (["--minibatch-fraction", "1.5"], "--minibatch-fraction"),
    (["--engine", "gd", "--beta", "0.5"], "--beta"),
    (["--tiles", "50x50"], "--tiles"),
    (["--slices", "2", "--slice-thickness=-1e-10"], "--slice-thickness"),
    (["--checkpoint-every=-1"], "--checkpoint-every"),
    (["--cluster", "nonsense"], "--cluster"),
    (["--cluster", "ucx", "--tls"], "--tls"),
    (["--scheduler-file", "{tmp}/missing.json"], "--scheduler-file"),
    (["--report", "{tmp}/no/such/dir/r.html"], "--report"),
    (["--timing", "{tmp}"], "--timing"),
]
if not _gpu_usable():
    BAD_BEFORE_START.append((["--device", "gpu"], "--device gpu"))


@pytest.mark.parametrize("args, flag", BAD_BEFORE_START, ids=[" ".join(a) for a, _ in BAD_BEFORE_START])
def test_bad_options_fail_before_any_cluster_starts(args, flag, small_pbtio3, tmp_path, monkeypatch, capsys):
    from daskptycho.cli import main

    _no_cluster(monkeypatch)
    out = tmp_path / "r.zarr"
    code = main(["reconstruct", str(small_pbtio3), "--out", str(out), "--iterations", "2",
                 *[a.format(tmp=tmp_path) for a in args]])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("daskptycho: error: ") and flag in lines[0], lines
    # the command line speaks flags, not the library's parameter names
    assert "option '" not in lines[0] and "=True" not in lines[0], lines
    assert not out.exists()


def test_an_existing_report_or_timing_file_is_refused_before_the_run(small_pbtio3, tmp_path, monkeypatch, capsys):
    from daskptycho.cli import main

    _no_cluster(monkeypatch)
    for flag in ("--report", "--timing"):
        taken = tmp_path / f"taken{flag}"
        taken.write_text("mine")
        code = main(["reconstruct", str(small_pbtio3), "--out", str(tmp_path / "r.zarr"), flag, str(taken)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and str(taken) in err[0] and "--overwrite" in err[0], err
        assert taken.read_text() == "mine"


# --------------------------------------------------------------------------- errors: parameters in Python, flags on the command line

def test_library_errors_name_parameters_and_the_cli_renders_flags(tmp_path, small_pbtio3, capsys):
    from daskptycho.cli import _parser, flag_map, main, to_flags
    from daskptycho.errors import OptionsError, OutputExistsError

    # the library speaks Python ...
    ds = dp.open_dataset(small_pbtio3)
    with pytest.raises(OutputExistsError) as e:
        dp.write_dataset(ds, small_pbtio3)
    assert e.value.parameter == "overwrite" and "pass overwrite=True" in str(e.value) and "--" not in str(e.value)
    with pytest.raises(OptionsError) as e:
        dp.connect("nonsense")
    assert e.value.parameter == "cluster" and "--" not in str(e.value)
    with pytest.raises(OptionsError) as e:
        dp.reconstruct(ds, engine="ml", tiles=(3, 3), iterations=1)
    assert e.value.parameter == "tiles" and "engine='gd'" in str(e.value)
    # ... the command line in flags, by the parser's own map from each option's dest to its flag
    parser = _parser()
    flags = flag_map(parser, "reconstruct")
    for action in parser.commands["reconstruct"]._actions:
        if action.option_strings and action.dest != "help":
            assert flags[action.dest] in action.option_strings
    assert flags["slice_thickness_m"] == "--slice-thickness" and flags["pad_px"] == "--pad-px"
    assert to_flags("use cluster='local' with tls=True; slices=1, tiles=(3, 3), pass slice_thickness_m=... and "
                    "overwrite=True; working_set_mib=8", flags) == \
        ("use --cluster local with --tls; --slices 1, --tiles 3x3, pass --slice-thickness and --overwrite; working_set_mib=8")
    assert main(["reconstruct", str(small_pbtio3), "--out", str(tmp_path / "r.zarr"), "--cluster", "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("daskptycho: error: --cluster: unknown cluster 'nonsense'") and "scheduler_file" not in err
    assert "--scheduler-file" in err


def test_library_code_names_no_flags():
    """Messages of the library name Python parameters; only cli.py speaks flags."""
    import pathlib
    import re

    root = pathlib.Path(dp.__file__).parent
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "cli.py":
            continue
        text = path.read_text()
        pattern = (r"\(CLI[: ]|(?:OptionsError|ClusterError|DeviceError|DatasetError|OutputExistsError)\(\s*f?[\"']--"
                   r"|\b(?:use|pass|drop|give|with|or) --[a-z]")
        for m in re.finditer(pattern, text):
            bad.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}")
    assert not bad, bad


# --------------------------------------------------------------------------- help, defaults, version

def _help(*args):
    p = run(*args, "--help")
    assert p.returncode == 0, p.stderr
    return " ".join(p.stdout.split())


def test_every_option_has_help_and_reconstruct_shows_the_real_defaults(monkeypatch):
    from daskptycho.cli import _parser

    for name, sub in _parser().commands.items():
        for action in sub._actions:
            assert action.help and action.help.strip(), (name, action.dest)
    # defaults are read from dask.config when the parser is built, not written into the help
    monkeypatch.setenv("DASK_DASKPTYCHO__RECONSTRUCT__ITERATIONS", "77")
    monkeypatch.setenv("DASK_DASKPTYCHO__RECONSTRUCT__SEED", "5")
    monkeypatch.setenv("DASK_DASKPTYCHO__RECONSTRUCT__COST", "poisson")
    text = _help("reconstruct")
    for flag, default in [("--iterations N", "77"), ("--seed SEED", "5"), ("--cost {amplitude,poisson}", "poisson"),
                          ("--slices N", "1"), ("--engine ENGINE", "gd"), ("--tiles RxC", "2x2"), ("--checkpoint-every K", "0"),
                          ("--beta BETA", "0.8"), ("--step STEP", "1")]:
        assert re.search(re.escape(flag) + r" [^(]*(\([^)]*\)[^(]*)*\(default: " + re.escape(default) + r"\)", text), (flag, default)
    assert "3x3 is 3 rows of 3 tiles" in text
    sim = _help("simulate")
    assert re.search(r"--energy EV beam energy in eV \(default: 200000 for pbtio3, 8000 for image and flyscan\)", sim)
    for cmd in ("graph", "import", "export", "view", "info"):
        _help(cmd)


def test_version(capsys):
    from daskptycho.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"daskptycho {dp.__version__}"
    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"daskptycho {dp.__version__}"
