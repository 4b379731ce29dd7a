"""The store an interrupted --checkpoint-every run leaves: said what it is and what to do,
by the library (open_dataset, open_result) and by info, reconstruct and view."""

from __future__ import annotations

import pytest

import daskptycho as dp
from daskptycho.cli import main
from daskptycho.errors import DatasetError
from daskptycho.io.checkpoint import Checkpoint


class _Stop(Exception):
    """Stands for the interrupt that ended the run."""


@pytest.fixture(scope="module")
def unfinished(small_pbtio3, client, tmp_path_factory):
    """A real ml run with a checkpoint every 2 iterations, stopped during its 4th of 6."""
    out = tmp_path_factory.mktemp("ck") / "r.zarr"

    def progress(it, cost):
        if it == 3:
            raise _Stop

    with pytest.raises(_Stop):
        dp.reconstruct(str(small_pbtio3), engine="ml", slices=2, iterations=6, checkpoint=str(out), checkpoint_every=2,
                       client=client, progress=progress)
    meta = Checkpoint(out).latest()
    assert meta is not None and meta["completed"] in (2, 4)
    return out, int(meta["completed"])


def test_the_library_says_what_the_store_is(unfinished):
    out, done = unfinished
    info = dp.io.checkpoint_info(out)
    assert info == {"engine": "ml", "completed": done, "iterations": 6, "checkpoint_every": 2}
    for opener in (dp.open_dataset, dp.open_result):
        with pytest.raises(DatasetError) as e:
            opener(out)
        msg = str(e.value)
        assert e.value.field == "store" and "\n" not in msg
        assert f"the checkpoint of an unfinished run (engine 'ml', {done} of 6 iterations completed)" in msg
        assert f"checkpoint={str(out)!r} resume=True iterations=6" in msg and "overwrite=True" in msg


def test_the_command_line_says_what_the_store_is(unfinished, small_pbtio3, tmp_path, capsys):
    out, done = unfinished
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{out}: the checkpoint of an unfinished daskptycho run" in text
    assert f"engine: ml, {done} of 6 iterations completed, a checkpoint every 2" in text
    assert f"--out {out} --resume --iterations 6" in text and f"--out {out} --overwrite" in text
    for argv in (["reconstruct", str(out), "--out", str(tmp_path / "new.zarr"), "--engine", "ml"],
                 ["view", str(out), "--out", str(tmp_path / "png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"{done} of 6 iterations completed" in err[0]
        assert f"--out {out} --resume --iterations 6" in err[0] and "--overwrite" in err[0]
        assert "resume=True" not in err[0] and "variable missing" not in err[0]
    assert not (tmp_path / "new.zarr").exists() and not (tmp_path / "png").exists()


def test_resume_continues_it(unfinished, small_pbtio3, capsys):
    out, done = unfinished
    assert main(["reconstruct", str(small_pbtio3), "--out", str(out), "--engine", "ml", "--slices", "2", "--iterations", "6",
                 "--workers", "1", "--resume", "--quiet"]) == 0
    res = dp.open_result(out)
    assert res.sizes["iteration"] == 6 and int(res.attrs["resumed_from_iteration"]) == done
    assert dp.io.checkpoint_info(out) is None


def test_a_store_interrupted_before_its_first_checkpoint(tmp_path, capsys):
    out = tmp_path / "r.zarr"
    Checkpoint(out).begin(2, {"object": ((1, 4, 4), "complex64")})  # begun, never committed
    assert dp.io.checkpoint_info(out)["completed"] is None
    with pytest.raises(DatasetError, match="interrupted before its first checkpoint.*overwrite=True"):
        dp.open_result(out)
    assert main(["info", str(out)]) == 0
    assert "interrupted before its first checkpoint: nothing to resume" in capsys.readouterr().out
