"""Ctrl-C on the command line: one line, exit status 130, no worker process left behind.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group, the embedded
cluster's worker processes included; the tests do the same (the CLI in its own session,
``os.killpg``).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

#: a progress line of a non-tty stderr (see daskptycho.cli._Progress)
PROGRESS = re.compile(r"^iteration +\d+/\d+ \[[#.]+\] cost \S+ +\d+\.\d s$")


def _lines(stream, q):
    for line in stream:
        q.put(line.rstrip("\n"))
    q.put(None)


def _alive(procs):
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def python_sigint():
    """SIGINT raising KeyboardInterrupt in this process, as Python sets it up when started from
    a terminal (a test run started in the background inherits SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _interrupt(store, out, trigger):
    """Run ``daskptycho reconstruct`` in its own session, SIGINT its process group once a
    stderr line matches ``trigger``; return (exit status, stderr lines before and after
    the signal, ``{pid: command line}`` of the CLI's descendants at the signal)."""
    cmd = [sys.executable, "-m", "daskptycho", "reconstruct", str(store), "--out", str(out), "--engine", "gd", "--tiles", "2x2",
           "--slices", "2", "--workers", "2", "--iterations", "1000000"]
    # faulthandler: a CLI that hangs is made to print where (SIGABRT) before the test fails
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    # as from a terminal: SIGINT at its default (a test run started in the background, as
    # `cmd &` in a script, inherits SIGINT ignored, and Python then installs no handler)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                         preexec_fn=_default_sigint)
    q = queue.Queue()
    reader = threading.Thread(target=_lines, args=(p.stderr, q), daemon=True)
    reader.start()
    before, after = [], []
    try:
        deadline = time.monotonic() + 240
        while True:
            line = q.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, f"the run ended before {trigger.pattern!r}: {before}"
            before.append(line)
            if trigger.search(line):
                break
        procs = {c.pid: " ".join(c.cmdline()) for c in psutil.Process(p.pid).children(recursive=True)}
        os.killpg(p.pid, signal.SIGINT)
        try:
            code = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGABRT)
            p.wait(timeout=30)
            reader.join(timeout=30)
            dump = [q.get() for _ in range(q.qsize())]
            raise AssertionError("the CLI did not exit within 120 s of SIGINT:\n" + "\n".join(x for x in dump if x and not PROGRESS.match(x))) from None
        while (line := q.get(timeout=60)) is not None:
            after.append(line)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        reader.join(timeout=30)
        p.stderr.close()
    return code, before, after, procs


def _assert_gone(pids, timeout=30):
    """Every process of ``pids`` ends (or is a zombie awaiting its reaper) within ``timeout`` seconds."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(procs), [(p.pid, pids[p.pid]) for p in _alive(procs)]


def test_ctrl_c_during_the_iterations_prints_one_line(small_pbtio3, tmp_path):
    code, before, after, procs = _interrupt(small_pbtio3, tmp_path / "r.zarr", PROGRESS)
    assert code == 130, after
    # progress lines written before the signal arrived may follow; then exactly the one line
    assert after and after[-1] == "daskptycho: interrupted", after
    assert all(PROGRESS.match(line) for line in after[:-1]), after
    # the embedded cluster's two worker processes were running, and none outlives the CLI
    workers = [pid for pid, cmd in procs.items() if "multiprocessing.spawn" in cmd]
    assert len(workers) == 2, procs
    _assert_gone(procs)
    assert not (tmp_path / "r.zarr").exists()


def test_ctrl_c_while_the_cluster_starts_prints_one_line(small_pbtio3, tmp_path):
    code, before, after, procs = _interrupt(small_pbtio3, tmp_path / "r.zarr", re.compile(r"^daskptycho: starting 2 workers"))
    assert code == 130, after
    assert after == ["daskptycho: interrupted"], after
    assert not any(PROGRESS.match(line) for line in before)
    _assert_gone(procs)


def test_worker_processes_hold_sigint_back(python_sigint):
    """The root of the quiet Ctrl-C: worker processes start with SIGINT blocked (the
    terminal's Ctrl-C stays pending in them), while this process still takes it."""
    import daskptycho as dp

    def blocked():
        with open(f"/proc/{os.getpid()}/status") as f:
            mask = next(line.split(":")[1] for line in f if line.startswith("SigBlk"))
        return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))

    with dp.connect("local", workers=2) as conn:
        assert set(conn.client.run(blocked).values()) == {True}
    assert not blocked()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupt_inside_a_finalizer_is_raised_again_not_lost(python_sigint):
    """A Ctrl-C that lands while the garbage collector runs a ``__del__`` (distributed's
    futures have one) would be printed as 'Exception ignored' and dropped, and the run
    would go on; the CLI's handler sends it again, to be raised a moment later."""
    from daskptycho.cli import _on_sigint, _sigint_handled

    class Doomed:
        def __del__(self):
            _on_sigint(signal.SIGINT, sys._getframe())  # as the handler is called when SIGINT lands here

    with _sigint_handled(), pytest.raises(KeyboardInterrupt):
        Doomed()  # collected at once: its __del__ meets the "signal"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.01)
        raise AssertionError("the interrupt was lost")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
