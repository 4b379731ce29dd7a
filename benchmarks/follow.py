"""Reconstructing while the scan is measured: the delay from a frame's commit to its first use.

    python -m benchmarks follow [--rates 25,100,400,1600 --scan 24]

A simulated X-ray scan (``image``, ``--scan`` x ``--scan`` positions, 32 px patterns)
is written as a growing store by :func:`daskptycho.simulate_stream` in a thread of this
process at each acquisition rate (frames per second, chunks of 16 frames), while
:func:`daskptycho.follow` reconstructs it with the defaults (gd 2x2) on a 2-worker
LocalCluster, 2 iterations per round and 20 after the scan. The writer's progress
callback records when each chunk was committed, the rounds record when each started, so
every frame's delay is measured: from its commit to the start of the first round that
uses it, in seconds and in iterations (the iterations that ran meanwhile). The final
image is scored against the truth (phase correlation over the scanned field) beside an
offline run of the same 20 iterations on the finished store.

"Keeps up" at a rate: 95% of the frames committed after the first round began and before
the scan's last commit are in use within two rounds (and one chunk's acquisition time) of
their commit (the rest wait behind a round slowed by the machine), and the last round that
starts before the scan's end already uses at
least 75% of its frames (a round uses every frame committed when it starts, so frames
never queue behind one another; what a faster acquisition costs is how much of the scan
the live image covers while it is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import numpy as np

from .common import write


def _one_rate(client, tmp, rate, scan, chunk, iterations_after, per_round):
    import daskptycho as dp
    from daskptycho.metrics import phase_correlation

    path = os.path.join(tmp, f"scan-{rate:g}.zarr")
    commits = []  # (frames_complete, wall time)
    t_start = time.time()
    writer = threading.Thread(target=dp.simulate_stream, args=(path, rate),
                              kwargs=dict(chunk_frames=chunk, kind="image", scan=(scan, scan), detector=32,
                                          progress=lambda fc, n: commits.append((fc, time.time()))))
    rounds = []
    writer.start()
    t0 = time.time()
    res = dp.follow(path, iterations_after=iterations_after, round_iterations=per_round, client=client, timeout_s=120, poll_s=0.05,
                    on_round=lambda r: rounds.append({**{k: v for k, v in r.items() if k != "result"}, "wall_start": t0 + r["started_s"]}))
    writer.join()
    n = scan * scan
    # each frame: when it was committed, when the first round that uses it began, the iterations in between
    commit_of = np.empty(n)
    prev = 0
    for fc, t in commits:
        commit_of[prev:fc] = t
        prev = fc
    used_at, used_it = np.full(n, np.nan), np.full(n, -1)
    prev = 0
    for r in rounds:
        used_at[prev:r["frames_used"]] = r["wall_start"]
        used_it[prev:r["frames_used"]] = r["first_iteration"]
        prev = r["frames_used"]
    delay = used_at - commit_of
    # iterations that ran between a frame's commit and its first use: those of rounds that started before its commit
    started = np.array([r["wall_start"] for r in rounds])
    first_it = np.array([r["first_iteration"] for r in rounds])
    it_at_commit = np.array([first_it[started <= c].max() if np.any(started <= c) else 0 for c in commit_of])
    delay_it = used_it - it_at_commit
    finish = commits[-1][1]
    during = [r for r in rounds if not r["scan_finished"]]
    round_s = statistics.median(r["seconds"] for r in during) if during else float("nan")
    ds = dp.open_dataset(path)
    offline = dp.reconstruct(ds, iterations=iterations_after, client=client)
    got, _ = phase_correlation(res.object, ds.truth_object, ds.position.values)
    ref, _ = phase_correlation(offline.object, ds.truth_object, ds.position.values)
    # in the steady state: frames committed after the first round began (the first rounds wait for enough
    # frames to fill the tiles) and before the scan's last commit (which waits for the final round by design)
    early = delay[(commit_of < finish) & (commit_of >= rounds[0]["wall_start"])]
    return {
        "rate_hz": rate, "frames": n, "chunk_frames": chunk, "acquisition_s": finish - commits[0][1],
        "rounds_during_scan": len(during), "round_s_median": round_s,
        "frames_used_before_the_end": during[-1]["frames_used"] if during else 0,
        "delay_s_median": float(np.median(delay)), "delay_s_max": float(np.max(delay)),
        "delay_s_max_steady": float(np.max(early)) if early.size else None,
        "delay_s_p95_steady": float(np.percentile(early, 95)) if early.size else None,
        "first_round_after_first_commit_s": rounds[0]["wall_start"] - commits[0][1],
        "delay_iterations_median": float(np.median(delay_it)), "delay_iterations_max": int(np.max(delay_it)),
        "keeps_up": bool((early.size == 0 or np.percentile(early, 95) <= 2 * round_s + chunk / rate)
                         and (during[-1]["frames_used"] if during else 0) >= 0.75 * n),
        "phase_correlation_follow": float(got), "phase_correlation_offline": float(ref),
        "wall_s": time.time() - t_start, "rounds": rounds,
    }


def highest_kept_up(rows):
    """The highest rate up to which every rate measured kept up (None if the slowest did not)."""
    best = None
    for r in sorted(rows, key=lambda r: r["rate_hz"]):
        if not r["keeps_up"]:
            break
        best = r["rate_hz"]
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks follow")
    ap.add_argument("--rates", default="25,50,100,200,400", help="acquisition rates, frames per second")
    ap.add_argument("--scan", type=int, default=24)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--iterations-after", type=int, default=20)
    ap.add_argument("--round-iterations", type=int, default=2)
    args = ap.parse_args(argv)

    from distributed import Client

    from daskptycho.cluster import local_cluster

    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, local_cluster(2) as cl, Client(cl) as client:
        for rate in (float(r) for r in args.rates.split(",")):
            row = _one_rate(client, tmp, rate, args.scan, args.chunk, args.iterations_after, args.round_iterations)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    path = write("follow", {"rows": rows, "highest_rate_kept_up_hz": highest_kept_up(rows),
                            "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                            "command": "python -m benchmarks follow " + " ".join(argv or [])})
    print(path)


if __name__ == "__main__":
    main()
