"""What one peer message costs: a request and its reply against one way over a kept comm.

    python -m benchmarks peer_messages [--messages 500 --repeats 3]

On a 2-worker LocalCluster with :class:`daskptycho.tasks.peer.PeerExchange` registered,
worker A sends ``--messages`` messages to worker B's mailbox handler, back to back, two
ways: ``request and reply`` (``rpc(B).daskptycho_peer_put(...)``, awaiting B's "OK"),
``one way`` (one comm opened with ``distributed.comm.connect`` and written with
``reply=False``, how :meth:`~daskptycho.tasks.peer.PeerExchange.send` sends to a worker
on another machine) and ``same-host socket`` (written by a task's thread on A to B's Unix
socket and read into B's mailbox by B's reader thread, how it sends to a worker on the
same machine; wall: from A's first write to the moment B's mailbox holds the last). Payloads: a tiny value, and
a gradient strip of the default-run case (92 x 142 px: complex64 object and float32
illumination, random). Reported per message: wall time on A, CPU time of A's process
and of B's process (``resource.getrusage``), medians over ``--repeats``. The CPU time is
what a worker's stage loses to its event loop on a machine whose cores its stages fill.
Writes benchmarks/results/peer_messages.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from .common import write

SIZES = {"tiny": 10, "strip 92x142": 92 * 142}


async def _send(address, n, size, oneway, dask_worker=None):
    import resource

    from distributed.comm import connect
    from distributed.protocol import to_serialize

    from daskptycho.tasks.peer import PUT

    value = _value(size)
    comm = await connect(address, **dask_worker.connection_args) if oneway else None
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(n):
        items = to_serialize([(i, value)])
        if oneway:
            await comm.write({"op": PUT, "channel": "bench|0", "items": items, "reply": False})
        else:
            await dask_worker.rpc(address).daskptycho_peer_put(channel="bench|0", items=items)
    if oneway:  # every message handled before the clock stops: one request and reply at the end
        await dask_worker.rpc(address).daskptycho_peer_put(channel="bench|0", items=to_serialize([]))
        await comm.close()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return t1 - t0, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def _value(size):
    rng = np.random.default_rng(0)
    return {"object": (rng.standard_normal(size) + 1j * rng.standard_normal(size)).astype(np.complex64),
            "illumination": rng.standard_normal(size).astype(np.float32)}


def _send_socket(address, n, size):
    """A's side of ``same-host socket``: the messages written by this thread to B's socket,
    as a stage's thread writes them (:meth:`~daskptycho.tasks.peer.PeerExchange.send`)."""
    import resource

    from distributed import get_worker

    from daskptycho.tasks.peer import NAME

    plugin = get_worker().plugins[NAME]
    value = _value(size)
    plugin.send(address, "warm-up|0", [(0, value)], 60.0)  # the peer's socket is asked for once
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(n):
        plugin.send(address, "bench|0", [(i, value)], 60.0).result()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    assert plugin._local.get(address) is not None, "the message went over the comm, not the socket"
    return t0, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def _receive(n):
    """B's side: wait until the ``n`` messages are in the mailbox; the moment the last came."""
    from distributed import get_worker

    from daskptycho.tasks.peer import NAME

    box = get_worker().plugins[NAME].mailbox
    want, got = set(range(n)), 0
    with box.cond:
        while got < n:
            got += len(box.poll("bench|0", want))
            if got < n:
                box.cond.wait(1.0)
    return time.perf_counter()


def _cpu():
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _clear(dask_worker=None):
    from daskptycho.tasks.peer import NAME

    dask_worker.plugins[NAME].mailbox.abort("bench", "benchmark round over")
    dask_worker.plugins[NAME].mailbox.aborted.clear()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks peer_messages")
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from distributed import Client

    from daskptycho.cluster import local_cluster
    from daskptycho.tasks.peer import PeerExchange

    load0 = os.getloadavg()
    rows = []
    with local_cluster(2) as cluster, Client(cluster) as client:
        client.register_plugin(PeerExchange())
        a, b = sorted(client.scheduler_info()["workers"])
        for label, size in SIZES.items():
            for way, oneway in (("request and reply", False), ("one way", True), ("same-host socket", None)):
                runs = []
                for r in range(args.repeats):
                    c0 = client.run(_cpu, workers=[b])[b]
                    if oneway is None:
                        done = client.submit(_receive, args.messages, workers=[b], key=f"bench-receive-{label}-{r}", pure=False)
                        t0, cpu_a = client.submit(_send_socket, b, args.messages, size, workers=[a], pure=False,
                                                  key=f"bench-send-{label}-{r}").result()
                        wall = done.result() - t0  # one clock: the workers share the machine's
                    else:
                        wall, cpu_a = client.run(_send, b, args.messages, size, oneway, workers=[a])[a]
                    cpu_b = client.run(_cpu, workers=[b])[b] - c0
                    client.run(_clear, workers=[b])
                    runs.append({k: v / args.messages * 1e3 for k, v in
                                 (("wall_ms", wall), ("sender_cpu_ms", cpu_a), ("receiver_cpu_ms", cpu_b))})
                row = {"payload": label, "payload_bytes": size * 12, "way": way, "runs": runs}
                row.update({k: statistics.median(r[k] for r in runs) for k in runs[0]})
                rows.append(row)
                print(f"{label:14s} {way:18s} wall {row['wall_ms']:.3f} ms  sender CPU {row['sender_cpu_ms']:.3f} ms  "
                      f"receiver CPU {row['receiver_cpu_ms']:.3f} ms", flush=True)
    out = write("peer_messages", {"messages": args.messages, "repeats": args.repeats, "rows": rows,
                                  "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                                  "command": "python -m benchmarks peer_messages " + " ".join(argv or [])})
    print(out)


if __name__ == "__main__":
    main()
