"""Where the default run's time goes inside its peer blocks, from the workers' timelines.

    python -m benchmarks stage_timeline [--repeats 3]

The default run's case (:mod:`benchmarks.default_run`: 26 x 26 positions of 96 x 96 px,
``daskptycho.reconstruct`` with its defaults, gd 2 x 2 tiles on a 2-worker LocalCluster)
with each worker recording its peer stages' timeline
(:func:`daskptycho.tasks.peer.record_timeline`): every task a stage runs (wall and thread
CPU time), every wait for a message, every message sent and read, and each stage (peer
block) from start to end. A fresh cluster per repeat.

Over the default run's spans (:func:`benchmarks.default_run.spans`: its minibatch
iterations, 4 pass rounds each, and its full-batch ones), per worker and iteration:

``tasks``
    wall and CPU time of the stage's tasks by kind (``grad``: a tile's gradient, the
    position kernel and the Python around it; ``update``, the strips, the probe ...);
    their wall time beyond their CPU time is time the thread was ready but had no core
    (another thread of this or another process ran);
``waiting``
    a stage waiting for a peer's message (the rounds' barriers);
``inside stages``
    the rest of the time inside stages: the dataflow's own bookkeeping and sending;
``between stages``
    from one block's end on a worker to the next one's start there: the scheduler's
    round trip from one block's stage to the next.

And per message: bytes, the sending thread's time, and the latency from the start of
its send to the end of its reading into the receiver's mailbox (the system's monotonic
clock, the same in both processes). Medians over the repeats. The timeline's own cost (a
CPU clock read per task) is small against a task (tens of ns against 0.1-3 ms), but the
iteration times here are not the benchmark's: those are
:mod:`benchmarks.default_run`'s. Writes benchmarks/results/stage_timeline.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from .common import write
from .default_run import DETECTOR, SCAN, spans


def _clip(a, b, lo, hi):
    """The length of [a, b] within [lo, hi]."""
    return max(0.0, min(b, hi) - max(a, lo))


def analyse(events_by_worker, lo, hi, n_iterations):
    """Per worker: ms per iteration of each part of the span ``[lo, hi]`` (seconds of
    ``time.perf_counter``), from :func:`~daskptycho.tasks.peer.take_timeline`'s events."""
    out = {}
    for w, events in events_by_worker.items():
        stages = sorted((e[2], e[3]) for e in events if e[0] == "stage")
        tasks, cpu, count = {}, {}, {}
        waiting = 0.0
        for e in events:
            if e[0] == "task":
                d = _clip(e[2], e[3], lo, hi)
                if d > 0:
                    share = d / max(e[3] - e[2], 1e-12)
                    tasks[e[1]] = tasks.get(e[1], 0.0) + d
                    cpu[e[1]] = cpu.get(e[1], 0.0) + e[4] * share
                    count[e[1]] = count.get(e[1], 0) + 1
            elif e[0] == "wait":
                waiting += _clip(e[2], e[3], lo, hi)
        in_stages = sum(_clip(a, b, lo, hi) for a, b in stages)
        between = sum(_clip(b0, a1, lo, hi) for (_, b0), (a1, _) in zip(stages, stages[1:]))
        per = 1e3 / n_iterations
        busy = sum(tasks.values())
        out[w] = {
            "span_ms_per_iteration": (hi - lo) * per,
            "tasks": {k: {"wall_ms": tasks[k] * per, "cpu_ms": cpu[k] * per, "per_iteration": count[k] / n_iterations}
                      for k in sorted(tasks, key=lambda k: -tasks[k])},
            "tasks_wall_ms": busy * per, "tasks_cpu_ms": sum(cpu.values()) * per,
            "waiting_ms": waiting * per,
            "inside_stages_ms": (in_stages - busy - waiting) * per,
            "between_stages_ms": between * per,
        }
    return out


def messages(events_by_worker, lo, hi):
    """Each message sent in ``[lo, hi]``: its bytes, the sender's time and the latency to
    the end of its reading on the receiver (matched by channel, in order)."""
    sends = {w: [e for e in ev if e[0] == "send" and lo <= e[2] <= hi] for w, ev in events_by_worker.items()}
    reads = {w: [e for e in ev if e[0] == "receive"] for w, ev in events_by_worker.items()}
    rows = []
    for w, ss in sends.items():
        others = [r for v, rr in reads.items() if v != w for r in rr]
        for s in ss:
            # the first read of the same channel that ends after the send started
            match = min((r for r in others if r[1] == s[1] and r[3] >= s[2]), key=lambda r: r[3], default=None)
            rows.append({"bytes": s[4], "send_ms": (s[3] - s[2]) * 1e3,
                         "latency_ms": (match[3] - s[2]) * 1e3 if match is not None else None})
    return rows


def _quantiles(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return {"median": statistics.median(v), "p90": v[min(len(v) - 1, int(0.9 * len(v)))], "n": len(v)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks stage_timeline")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import dask
    from distributed import Client

    import daskptycho as dp
    from daskptycho.cluster import local_cluster
    from daskptycho.engines import engine_options
    from daskptycho.tasks import peer

    load0 = os.getloadavg()
    block = int(dask.config.get("daskptycho.schedule.block_iterations"))
    defaults = engine_options()
    span = spans(defaults.iterations, defaults.minibatch_iterations(), block)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scan.zarr")
        dp.write_dataset(dp.simulate(kind="image", scan=(SCAN, SCAN), detector=DETECTOR), path)
        ds = dp.open_dataset(path)
        with dask.config.set({"daskptycho.dashboard.live": False}):
            for _ in range(args.repeats):
                with local_cluster(2) as cluster, Client(cluster) as client:
                    # the driver's registration of the same plugin is then a no-op
                    client.register_plugin(peer.PeerExchange(same_host_sockets=bool(
                        dask.config.get("daskptycho.schedule.same_host_sockets", True))))
                    client.run(peer.record_timeline, True)
                    stamps = []
                    dp.reconstruct(ds, client=client, progress=lambda it, c, stamps=stamps: stamps.append(time.perf_counter()))
                    events = {w[-5:]: ev for w, ev in client.run(peer.take_timeline).items()}
                run = {}
                for kind in ("minibatch", "full batch"):
                    if span[kind] is None:
                        continue
                    a, b = span[kind]
                    lo, hi = stamps[a], stamps[b]
                    run[kind] = {"iteration_ms": (hi - lo) / (b - a) * 1e3, "workers": analyse(events, lo, hi, b - a),
                                 "messages": messages(events, lo, hi)}
                runs.append(run)
                print({k: round(v["iteration_ms"], 1) for k, v in run.items()}, flush=True)

    summary = {}
    for kind in runs[0]:
        ws = [w for r in runs for w in r[kind]["workers"].values()]
        kinds = sorted({k for w in ws for k in w["tasks"]}, key=lambda k: -statistics.median(w["tasks"].get(k, {"wall_ms": 0})["wall_ms"] for w in ws))

        def med(f, ws=ws):
            return statistics.median(f(w) for w in ws)

        msgs = [m for r in runs for m in r[kind]["messages"]]
        summary[kind] = {
            "iteration_ms": statistics.median(r[kind]["iteration_ms"] for r in runs),
            "tasks": {k: {q: med(lambda w, k=k, q=q: w["tasks"].get(k, {q: 0.0})[q]) for q in ("wall_ms", "cpu_ms", "per_iteration")}
                      for k in kinds},
            **{q: med(lambda w, q=q: w[q]) for q in ("tasks_wall_ms", "tasks_cpu_ms", "waiting_ms", "inside_stages_ms", "between_stages_ms")},
            "messages_per_worker_iteration": len(msgs) / (len(runs) * 2 * (span[kind][1] - span[kind][0])),
            "message_bytes": _quantiles(m["bytes"] for m in msgs),
            "send_ms": _quantiles(m["send_ms"] for m in msgs),
            "latency_ms": _quantiles(m["latency_ms"] for m in msgs),
        }
    out = write("stage_timeline", {
        "dataset": f"simulate(kind='image', scan=({SCAN}, {SCAN}), detector={DETECTOR}): {SCAN * SCAN} positions, single slice",
        "iterations": defaults.iterations, "block_iterations": block, "spans": {k: list(v) if v else None for k, v in span.items()},
        "repeats": args.repeats, "summary": summary, "runs": runs, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "command": "python -m benchmarks stage_timeline " + " ".join(argv or []),
    })
    for kind, s in summary.items():
        print(kind, {k: round(v, 2) for k, v in s.items() if isinstance(v, float)})
    print(out)


if __name__ == "__main__":
    main()
