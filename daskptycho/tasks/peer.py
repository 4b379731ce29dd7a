"""Strips between workers without the scheduler: a fused stage's messages sent worker to worker.

With ``daskptycho.schedule.exchange: peer`` an iteration's fused stages
(:func:`~daskptycho.schedule.fuse.fuse_by_worker`) hand the values another worker's
stage needs (gd's strips, hve's core pieces) straight to that worker, over the same
connections (TCP, or UCX under dask-cuda) that distributed uses between workers, instead
of through a task the scheduler has to place and announce. The scheduler then sees one
task per worker and stage, and its share of an iteration no longer grows with the
exchanges: the per-task cost that bounds the tile graph at thousands of tiles
(``docs/performance.md``) is paid per worker, not per strip.

Inside a stage the tasks run as a small dataflow: the first task (in the builder's
order) whose inputs are all there runs next, and a task waiting for a message from
another worker lets the others go first, so the passes still pipeline across
directions. Every stage sends what it computed for a peer before any task that was slow
(more than :data:`QUICK_S`) the last time one of its kind ran, before it waits, and as
soon as no further value for that peer is one quick task away: the values for one peer
cut in a row (a tile's strips, a probe part) leave as one message, with neither a
gradient's time nor the stage's own steps added to their journey. Deadlock is not
possible: all stages run their tasks in one global topological order restricted to
what is ready, so the earliest unfinished task of the whole iteration always has its
inputs.

Between workers of one machine (``daskptycho.schedule.same_host_sockets``, on by default,
off under TLS) a message goes over the receiving worker's Unix socket, in a directory only
its user can enter: the sending stage's thread writes it, a thread of the receiver reads it
into the mailbox, and neither worker's event loop is on its way.

A stage waiting for messages leaves the worker's thread pool (``distributed.secede``),
so the small tasks a worker still runs for the scheduler (the costs, the probe parts)
never wait behind it.

Failure: a stage that fails tells its peers, whose waiting stages then fail too; the
driver, which sees a lost worker by polling, aborts the attempt's messages on every
worker (:func:`abort`) before it starts again from the last checkpoint. A message that
does not come within ``daskptycho.schedule.peer_timeout_s`` (of the process that built the
graph) fails the stage with
:class:`~daskptycho.errors.PeerExchangeError`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import heapq
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass

from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import PeerExchangeError
from .stage import Slot, StageSpec, evaluate

__all__ = ["NAME", "PeerExchange", "Receive", "PeerStage", "run_peer_stage", "run_peer_block", "stage_body", "abort",
           "record_timeline", "take_timeline"]

#: the plugin's name on every worker, and the handlers it adds
NAME = "daskptycho-peer"
PUT = "daskptycho_peer_put"
ABORT = "daskptycho_peer_abort"
WHERE = "daskptycho_peer_where"

log = logging.getLogger("daskptycho")

#: a task kind that last ran in less (seconds) does not hold back the values waiting to leave
QUICK_S = 0.5e-3

#: how many of the next values for a peer a stage looks at to decide whether to hold the
#: ones it has for that peer (a round sends a peer a few: its strips and a probe part)
NEAR_SENDS = 4

#: the most events a worker's timeline keeps (:func:`record_timeline`), the oldest dropped first
TIMELINE_EVENTS = 200_000


@dataclass(frozen=True)
class Receive:
    """An input of a task in a peer stage: message ``msg`` of the stage's channel, sent by
    another worker's stage."""

    msg: int


@dataclass(frozen=True)
class PeerStage:
    """A fused stage that exchanges messages with the stages of other workers.

    Attributes
    ----------
    stage : StageSpec
        The tasks (their inputs :class:`~daskptycho.tasks.stage.Slot` or :class:`Receive`),
        exports and releases, as :func:`~daskptycho.tasks.stage.run_stage` takes them.
    channel : str
        The messages' namespace: the run's attempt and the iteration (``"<tag>|<it>"``).
    sends : tuple of ``(key, msg, (address, ...))``
        The values that leave: task ``key``'s result goes, as message ``msg``, to each address.
    peers : tuple of str
        Every worker this stage sends to or receives from (told when the stage fails).
    timeout_s : float
        How long the stage waits for a message before it fails
        (``daskptycho.schedule.peer_timeout_s`` where the graph was built).
    """

    stage: StageSpec
    channel: str
    sends: tuple = ()
    peers: tuple = ()
    timeout_s: float = 300.0


def _tag_of(channel):
    return channel.split("|", 1)[0]


class _Mailbox:
    """Messages that have arrived for the stages of this worker, by ``(channel, msg)``."""

    def __init__(self):
        self.cond = threading.Condition()
        self.box = {}
        self.fresh = {}  # channel -> its messages that arrived and no stage has taken yet
        self.aborted = {}  # tag -> reason

    def put(self, channel, items):
        """Keep the messages ``items`` (``[(msg, value), ...]``) of ``channel``."""
        with self.cond:
            if _tag_of(channel) in self.aborted:
                return
            for msg, value in items:
                self.box[(channel, msg)] = value
                self.fresh.setdefault(channel, []).append(msg)
            self.cond.notify_all()

    def abort(self, tag, reason):
        with self.cond:
            self.aborted[tag] = reason
            for k in [k for k in self.box if _tag_of(k[0]) == tag]:
                del self.box[k]
            for c in [c for c in self.fresh if _tag_of(c) == tag]:
                del self.fresh[c]
            self.cond.notify_all()

    def poll(self, channel, msgs):
        """Pop and return ``{msg: value}`` of the messages among ``msgs`` that have arrived
        (waiting for one is the caller's business). Only the channel's unclaimed messages
        are looked at, not every awaited one: a stage awaiting thousands of messages does
        not scan them all after each of its tasks."""
        got, left = {}, []
        for m in self.fresh.pop(channel, ()):
            if m in msgs:
                got[m] = self.box.pop((channel, m))
            else:  # for another stage of this worker on the same channel
                left.append(m)
        if left:
            self.fresh[channel] = left
        return got

    def check(self, channel):
        reason = self.aborted.get(_tag_of(channel))
        if reason is not None:
            raise PeerExchangeError(f"the messages of {channel} were aborted: {reason}")


class PeerExchange(WorkerPlugin):
    """The worker side of peer messages: a mailbox and the handlers that fill it.

    Registered by the driver for runs with ``daskptycho.schedule.exchange: peer``; workers
    that join later (a restarted worker) get it too.

    Parameters
    ----------
    same_host_sockets : bool
        Open this worker's Unix socket, and send to peers on the same machine over theirs
        (the driver passes ``daskptycho.schedule.same_host_sockets``). Never under TLS: a
        cluster that asks for encryption keeps every message to its encrypted comms.
    """

    idempotent = True
    name = NAME

    def __init__(self, same_host_sockets=True):
        self.same_host_sockets = bool(same_host_sockets)

    def setup(self, worker):
        self.worker = worker
        self.mailbox = _Mailbox()
        self._comms, self._locks = {}, {}  # address -> the open comm this worker's messages go over, its write lock
        self._local = {}  # address -> that peer's same-host socket (a _LocalLink), or None: use the comm
        self._local_lock = threading.Lock()
        self.inbox = None
        self.timeline = None  # a bounded deque of events while recording (record_timeline), else None
        self.took = {}  # task kind -> seconds the last one of its kind took in a stage here (_run's sending rule)
        # TLS asked for: every message keeps to the encrypted comms
        if self.same_host_sockets and hasattr(socket, "AF_UNIX") and not worker.security.require_encryption:
            try:
                self.inbox = _LocalInbox(self.mailbox, worker.local_directory, timeline=lambda: self.timeline)
            except OSError as e:
                log.warning("peer messages on %s go over its comms only: no same-host socket (%s)", worker.address, e)
        worker.handlers[PUT] = self._put
        worker.handlers[ABORT] = self._abort
        worker.handlers[WHERE] = self._where

    def teardown(self, worker):
        for h in (PUT, ABORT, WHERE):
            worker.handlers.pop(h, None)
        for comm in self._comms.values():
            comm.abort()
        self._comms.clear()
        for link in self._local.values():
            if link is not None:
                link.close()
        self._local.clear()
        if self.inbox is not None:
            self.inbox.close()

    def _where(self):
        """This worker's same-host socket: ``{"host": <this machine's id>, "path": <socket>}``
        or None."""
        return None if self.inbox is None else {"host": _host_id(), "path": self.inbox.path}

    def _link(self, address, timeout):
        """The same-host socket to ``address``'s worker, or None (another machine, or the
        fast path off there or here). Asked once per peer, over the worker's comm."""
        with self._local_lock:
            if address in self._local:
                return self._local[address]
        link = None
        if self.inbox is not None and address != self.worker.address:
            async def ask():
                return await self.worker.rpc(address).daskptycho_peer_where()
            try:
                where = asyncio.run_coroutine_threadsafe(ask(), self.worker.loop.asyncio_loop).result(timeout=60)
            except Exception:  # noqa: BLE001 - a peer that cannot answer: its comm reports what is wrong
                where = None
            if where and where.get("host") == _host_id():
                try:
                    link = _LocalLink(where["path"], timeout)
                except OSError:  # another filesystem namespace (a container) after all: the comm works
                    link = None
        with self._local_lock:
            return self._local.setdefault(address, link)

    async def _put(self, channel=None, items=None):
        self.mailbox.put(channel, items)
        return "OK"

    def _abort(self, tag=None, reason=None):
        self.mailbox.abort(tag, reason or "aborted")
        return "OK"

    def send(self, address, channel, items, timeout=300.0):
        """Send the messages ``items`` (``[(msg, value), ...]``) to ``address``'s mailbox,
        together; returns a ``concurrent.futures.Future`` that is done once the message is
        written. Called from a stage's thread.

        A peer on the same machine (``daskptycho.schedule.same_host_sockets``, not under
        TLS) gets host values over its Unix socket, written here by the calling thread,
        and read on the peer by a thread of its own: no hop through either worker's event
        loop, which on a busy machine waits for a core before it can run (the time a
        message takes on its way, and the CPU it costs, are measured side by side by
        ``python -m benchmarks peer_messages``). Other peers, and device arrays, go one
        way over one comm kept open (distributed's ``reply=False``: the peer's server runs
        the handler and reads the next message), in the order they are sent, on the
        worker's event loop. A message is not acknowledged: a peer that is gone is the
        driver's to notice (it aborts the attempt's messages everywhere).

        Raises
        ------
        PeerExchangeError
            The same-host socket failed (the peer is gone, or did not read for ``timeout`` s).
        """
        from distributed.comm import connect
        from distributed.protocol import to_serialize

        link = self._link(address, timeout)
        message = None
        if link is not None:
            try:
                message = link.encode(channel, items)
            except _NotPlain:  # device arrays: the comm (UCX) moves them
                message = None
        if message is not None:
            done = concurrent.futures.Future()
            try:
                link.send(*message)
            except OSError as e:
                with self._local_lock:
                    self._local.pop(address, None)
                link.close()
                raise PeerExchangeError(f"a message to {address} over its same-host socket failed: {e!r}") from e
            done.set_result(None)
            return done

        async def go():
            lock = self._locks.setdefault(address, asyncio.Lock())
            async with lock:  # one writer per comm at a time
                comm = self._comms.get(address)
                if comm is None or comm.closed():
                    comm = self._comms[address] = await connect(address, **self.worker.connection_args)
                await comm.write({"op": PUT, "channel": channel, "items": to_serialize(items), "reply": False})

        return asyncio.run_coroutine_threadsafe(go(), self.worker.loop.asyncio_loop)

    def tell_abort(self, addresses, tag, reason):
        """Abort ``tag``'s messages here and at ``addresses`` (best effort: a peer may be gone)."""
        self.mailbox.abort(tag, reason)

        async def go(a):
            try:
                await self.worker.rpc(a).daskptycho_peer_abort(tag=tag, reason=reason)
            except Exception:  # noqa: BLE001 - a peer that is gone needs no telling
                pass

        for a in addresses:
            if a != self.worker.address:
                asyncio.run_coroutine_threadsafe(go(a), self.worker.loop.asyncio_loop)


def _host_id():
    """This machine (and its kernel's boot): peers with the same id share a filesystem
    namespace where the other's socket can be reached."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class _NotPlain(TypeError):
    """A value the same-host format does not carry (it goes over the comm)."""


def _encode(value, arrays):
    """``value`` as JSON-able data, its host arrays appended to ``arrays`` (each referred to
    by its index). Carries NumPy arrays and scalars of numeric dtypes, Python scalars,
    strings, None, and lists, tuples and dicts of them; anything else (a device array, an
    object) raises :class:`_NotPlain`. No pickle: nothing a message holds can be code."""
    import numpy as np

    if type(value) is np.ndarray or isinstance(value, np.generic):
        a = np.asarray(value)
        if a.dtype.hasobject:
            raise _NotPlain("an object array")
        arrays.append(np.ascontiguousarray(a))
        return {"a": len(arrays) - 1, "dtype": a.dtype.str, "shape": list(a.shape), "scalar": isinstance(value, np.generic)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"v": value}
    if isinstance(value, complex):
        return {"c": [value.real, value.imag]}
    if isinstance(value, (list, tuple)):
        return {"l" if isinstance(value, list) else "t": [_encode(v, arrays) for v in value]}
    if isinstance(value, dict):
        return {"d": [[_encode(k, arrays), _encode(v, arrays)] for k, v in value.items()]}
    raise _NotPlain(type(value).__name__)


def _decode(data, arrays):
    """The value :func:`_encode` described, its arrays views of the received buffers."""
    import numpy as np

    if "a" in data:
        dtype = np.dtype(data["dtype"])
        if dtype.hasobject:
            raise ValueError("a same-host message holds an object array")
        a = arrays[data["a"]].view(dtype).reshape(data["shape"])
        return a[()] if data["scalar"] else a
    if "v" in data:
        return data["v"]
    if "c" in data:
        return complex(*data["c"])
    if "l" in data:
        return [_decode(v, arrays) for v in data["l"]]
    if "t" in data:
        return tuple(_decode(v, arrays) for v in data["t"])
    return {_decode(k, arrays): _decode(v, arrays) for k, v in data["d"]}


#: a same-host message: this header (bytes of the JSON description of ``[channel, items]``,
#: number of arrays), the description (:func:`_encode`), each array's bytes (uint64), then
#: the arrays' bytes
_HEAD = struct.Struct("<QI")
_LEN = struct.Struct("<Q")

#: bytes a same-host socket may hold before its peer reads them (the kernel caps the
#: request at ``net.core.wmem_max``): a round's strips, hundreds of kB, then leave in one
#: write instead of waiting, a chunk at a time, for the peer's reading thread to get a
#: core. Measured in minibatch runs on 2 busy cores (676 positions, 2x2 tiles), median
#: per message: the write 0.2 ms instead of 0.4-0.6 ms, the read 0.15 ms instead of
#: 0.3-0.5 ms; the iteration's wall time moved less than this machine's noise (10%)
SEND_BUFFER_BYTES = 4 << 20


class _LocalLink:
    """The sending end of a same-host peer's socket: whole messages written from the
    stage's own thread (no hop through the event loop), one writer at a time."""

    def __init__(self, path, timeout):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)  # a peer that stops reading fails the stage, as a message that never comes does
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except OSError:  # a kernel that refuses: its default buffer works, only slower
            pass
        self.sock.connect(path)
        self.lock = threading.Lock()

    @staticmethod
    def encode(channel, items):
        """The message's description (bytes) and its arrays; raises :class:`_NotPlain`."""
        import json

        arrays = []
        head = json.dumps(_encode([channel, items], arrays), separators=(",", ":")).encode()
        return head, arrays

    def send(self, head, arrays):
        """Write one message (:meth:`encode`'s) whole."""
        raws = [memoryview(a.reshape(-1)).cast("B") for a in arrays]
        lead = _HEAD.pack(len(head), len(raws)) + head + b"".join(_LEN.pack(r.nbytes) for r in raws)
        with self.lock:
            self.sock.sendall(lead)
            for r in raws:  # the arrays' own memory: no copy before the kernel's
                self.sock.sendall(r)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def _recv_exact(conn, n):
    """``n`` bytes from ``conn``, in a buffer of their own (not zeroed first)."""
    import numpy as np

    buf = np.empty(n, dtype=np.uint8)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError
        got += k
    return buf


class _LocalInbox:
    """The receiving end: a Unix socket in a directory only this user can enter, and a
    thread per connected peer that puts each message into the mailbox as it arrives."""

    def __init__(self, mailbox, directory=None, timeline=lambda: None):
        self.mailbox = mailbox
        self.timeline = timeline  # () -> the worker's timeline (a deque) while one is recorded, else None
        # mode 0700: no other user can reach the socket. In the worker's own directory,
        # which distributed cleans up after a worker that was killed; else in the system's
        # temporary directory, where that path would be too long for a socket's name (108
        # bytes on Linux) or its filesystem holds no sockets
        places = [d for d in (directory, None) if d is None or len(os.path.join(d, "daskptycho-peer-xxxxxxxx", "s")) < 100]
        for i, place in enumerate(places):
            self.dir = tempfile.mkdtemp(prefix="daskptycho-peer-", dir=place)
            self.path = os.path.join(self.dir, "s")
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.bind(self.path)
                break
            except OSError:
                self.sock.close()
                shutil.rmtree(self.dir, ignore_errors=True)
                if i == len(places) - 1:
                    raise
        self.sock.listen(64)
        self.closed = False
        threading.Thread(target=self._accept, name="daskptycho-peer-accept", daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), name="daskptycho-peer-read", daemon=True).start()

    def _read(self, conn):
        import json

        try:
            while True:
                n_head, n_bufs = _HEAD.unpack(_recv_exact(conn, _HEAD.size).tobytes())
                start = time.perf_counter()
                head = _recv_exact(conn, n_head)
                sizes = struct.unpack(f"<{n_bufs}Q", _recv_exact(conn, 8 * n_bufs).tobytes()) if n_bufs else ()
                bufs = [_recv_exact(conn, n) for n in sizes]
                channel, items = _decode(json.loads(head.tobytes()), bufs)
                self.mailbox.put(channel, items)
                timeline = self.timeline()
                if timeline is not None:
                    timeline.append(("receive", channel, start, time.perf_counter(), n_head + sum(sizes)))
        except (EOFError, OSError):
            pass  # the peer closed its end (it stopped, or was lost)
        except Exception:  # noqa: BLE001 - a stage waiting for the message times out and says which
            log.exception("a same-host peer message could not be read")
        finally:
            conn.close()

    def close(self):
        self.closed = True
        try:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            self.sock.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def abort(tag, reason="aborted by the driver", dask_worker=None):
    """Abort the messages of run attempt ``tag`` on this worker (``Client.run`` calls it on
    all): stages waiting for them fail, later ones are dropped on arrival."""
    plugin = dask_worker.plugins.get(NAME) if dask_worker is not None else None
    if plugin is not None:
        plugin.mailbox.abort(tag, reason)


def _reads(arg, slots, msgs):
    """The in-stage keys and the messages a task reads."""
    if isinstance(arg, Slot):
        if arg.index is None:
            slots.add(arg.name)
    elif isinstance(arg, Receive):
        msgs.add(arg.msg)
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            _reads(a, slots, msgs)
    return slots, msgs


def run_peer_stage(spec: PeerStage, *inputs):
    """Run a peer stage on this worker (module docstring); returns ``{key: value}`` of its
    exports, like :func:`~daskptycho.tasks.stage.run_stage`, once its messages are delivered.

    Raises
    ------
    PeerExchangeError
        A message was aborted or did not come in time.
    """
    from distributed import get_worker, secede

    worker = get_worker()
    plugin = worker.plugins.get(NAME)
    if plugin is None:
        raise PeerExchangeError(f"worker {worker.address} has no {NAME} plugin: peer stages are submitted by "
                                "the daskptycho driver, which registers it (daskptycho.schedule.exchange: peer)")
    secede()  # waiting for peers must not hold a slot of the worker's thread pool
    start = time.perf_counter()
    try:
        return _run(spec, inputs, plugin, float(spec.timeout_s))
    except BaseException as e:
        plugin.tell_abort(spec.peers, _tag_of(spec.channel), f"stage {spec.channel} on {worker.address} failed: {e!r}"[:500])
        raise
    finally:
        timeline = plugin.timeline
        if timeline is not None:
            timeline.append(("stage", spec.channel, start, time.perf_counter(), len(spec.stage.tasks)))


def stage_body(spec: PeerStage):
    """``spec`` itself: a task whose result keeps a stage's body on its worker, so that
    every block after the first sends only the stage's inputs and channel
    (:func:`run_peer_block`). Its dataflow is planned here, when the body arrives, not at
    the start of its first block."""
    _plan(spec)
    return spec


def run_peer_block(spec: PeerStage, channel, *inputs):
    """:func:`run_peer_stage` of a body kept on this worker (:func:`stage_body`), with the
    message namespace ``channel`` of this block."""
    return run_peer_stage(dataclasses.replace(spec, channel=str(channel)), *inputs)


@dataclass(frozen=True)
class _Plan:
    """What a stage's dataflow needs to know of its body, worked out once per body: every
    block of a run's shape runs the same body (:func:`stage_body`), and working this out
    over a block's hundreds of tasks took 2-2.6 ms at each block's start (480 tasks)."""

    sent: tuple  # the stage's ``sends`` this plan was made for
    sends: dict  # key -> (msg, addresses)
    task_slots: tuple  # per task: the in-stage keys it reads
    task_msgs: tuple  # per task: the messages it reads
    missing: tuple  # per task: how many of its inputs are not there at the start
    readers_of_key: dict  # in-stage key -> the tasks that read it
    readers_of_msg: dict  # message -> the tasks that read it
    exports: frozenset
    producers: tuple  # per task: the tasks of the stage whose values it reads
    sends_to: dict  # address -> the tasks whose values go to it, in order


#: ``{id(stage body): (weak reference to it, its _Plan)}``; an entry goes with its body
_PLANS = {}
_PLANS_LOCK = threading.Lock()


def _plan(spec):
    """The :class:`_Plan` of ``spec``'s body, from the cache when this body ran before."""
    stage = spec.stage
    with _PLANS_LOCK:
        hit = _PLANS.get(id(stage))
    if hit is not None and hit[0]() is stage and hit[1].sent == tuple(spec.sends):
        return hit[1]
    tasks = stage.tasks
    index = {key: i for i, (key, _) in enumerate(tasks)}
    missing, task_slots, task_msgs = [], [], []
    readers_of_key, readers_of_msg = {}, {}
    for i, (_, task) in enumerate(tasks):
        slots, msgs = _reads(task, set(), set())
        slots = frozenset(k for k in slots if k in index)  # computed earlier in the stage
        task_slots.append(slots)
        task_msgs.append(frozenset(msgs))
        missing.append(len(slots) + len(msgs))
        for k in slots:
            readers_of_key.setdefault(k, []).append(i)
        for m in msgs:
            readers_of_msg.setdefault(m, []).append(i)
    sends_to = {}
    for key, _, addrs in spec.sends:
        for a in addrs:
            sends_to.setdefault(a, []).append(index[key])
    plan = _Plan(tuple(spec.sends), {key: (msg, addrs) for key, msg, addrs in spec.sends}, tuple(task_slots), tuple(task_msgs), tuple(missing),
                 {k: tuple(v) for k, v in readers_of_key.items()}, {m: tuple(v) for m, v in readers_of_msg.items()},
                 frozenset(stage.exports), tuple(tuple(index[k] for k in slots) for slots in task_slots),
                 {a: tuple(sorted(v)) for a, v in sends_to.items()})
    key = id(stage)
    try:
        ref = weakref.ref(stage, functools.partial(_forget_plan, key))
    except TypeError:  # a body that cannot be referred to weakly is planned every time
        return plan
    with _PLANS_LOCK:
        _PLANS[key] = (ref, plan)
    return plan


def _forget_plan(key, ref):
    with _PLANS_LOCK:
        if key in _PLANS and _PLANS[key][0] is ref:
            del _PLANS[key]


def _run(spec, inputs, plugin, timeout):
    stage = spec.stage
    tasks = stage.tasks
    box = plugin.mailbox
    plan = _plan(spec)
    sends, task_slots, task_msgs = plan.sends, plan.task_slots, plan.task_msgs
    readers_of_key, readers_of_msg = plan.readers_of_key, plan.readers_of_msg
    missing = list(plan.missing)
    # tasks run out of the builder's order here, so a value is dropped after its last
    # reader has run, whichever that is (not after the last reader in the order)
    exports = plan.exports
    readers_left = {k: len(v) for k, v in readers_of_key.items()}
    msg_readers_left = {m: len(v) for m, v in readers_of_msg.items()}
    ready = [i for i, n in enumerate(missing) if n == 0]
    heapq.heapify(ready)
    cache, received, outgoing = {}, {}, []
    waiting = set(readers_of_msg)
    timeline = plugin.timeline
    done = 0
    deadline = time.monotonic() + timeout

    def arrived(got):
        for m, v in got.items():
            received[m] = v
            waiting.discard(m)
            for i in readers_of_msg[m]:
                missing[i] -= 1
                if missing[i] == 0:
                    heapq.heappush(ready, i)

    def receive(arg):
        if isinstance(arg, Receive):
            return received[arg.msg]
        return arg

    # values for the same peer computed in a row travel in one message: they are held while
    # another value for that peer is at most one quick task away (a task that can run now, or
    # one whose inputs all can, quickly), which then runs first, and sent before anything
    # slower and before the stage waits: a peer is never kept waiting while this stage runs
    # work of its own (its steps, its probe) that the next values for the peer do not need.
    # Tasks run out of the heap's order that way are skipped when the heap hands them out.
    pending, took = {}, plugin.took
    finished = bytearray(len(tasks))
    sends_to, producers = plan.sends_to, plan.producers
    first_unsent = dict.fromkeys(sends_to, 0)

    def quick(j):
        return took.get(_kind(tasks[j][0]), QUICK_S) < QUICK_S

    def runnable(j):
        return missing[j] == 0 and not finished[j]

    def next_for(address):
        """The task to run next towards the next value for ``address``, or None when that
        value is not one quick task away."""
        order = sends_to[address]
        k = first_unsent[address]
        while k < len(order) and finished[order[k]]:
            k += 1
        first_unsent[address] = k
        for j in order[k:k + NEAR_SENDS]:
            if finished[j] or not quick(j):
                continue
            if runnable(j):
                return j
            if task_msgs[j] & waiting:
                continue
            todo = [p for p in producers[j] if not finished[p]]
            if todo and all(runnable(p) and quick(p) for p in todo):
                return min(todo)
        return None

    def has_ready():
        while ready and finished[ready[0]]:
            heapq.heappop(ready)
        return bool(ready)

    def flush(addresses=None):
        for address in list(pending) if addresses is None else addresses:
            items = pending.pop(address)
            start = time.perf_counter()
            outgoing.append((address, plugin.send(address, spec.channel, items, timeout)))
            if timeline is not None:
                timeline.append(("send", spec.channel, start, time.perf_counter(), _nbytes(items)))

    while done < len(tasks):
        first = None
        if pending:
            if not has_ready() or not quick(ready[0]):
                flush()
            else:
                for address in list(pending):
                    j = next_for(address)
                    if j is None:
                        flush([address])
                    elif first is None:
                        first = j
        with box.cond:
            while first is None:
                box.check(spec.channel)
                if waiting:
                    arrived(box.poll(spec.channel, waiting))
                if has_ready():
                    break
                if not waiting:
                    raise PeerExchangeError(f"stage {spec.channel}: no task can run and no message is awaited (a malformed stage)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerExchangeError(f"stage {spec.channel}: messages {sorted(waiting)[:8]} did not arrive within "
                                            f"{timeout:g} s (daskptycho.schedule.peer_timeout_s)")
                if timeline is None:
                    box.cond.wait(min(left, 1.0))
                else:
                    start = time.perf_counter()
                    box.cond.wait(min(left, 1.0))
                    timeline.append(("wait", spec.channel, start, time.perf_counter()))
        i = heapq.heappop(ready) if first is None else first
        key, task = tasks[i]
        start = time.perf_counter()
        cpu = time.thread_time() if timeline is not None else 0.0
        value = evaluate(task, inputs, cache, receive)
        end = time.perf_counter()
        took[_kind(key)] = end - start
        if timeline is not None:
            timeline.append(("task", _kind(key), start, end, time.thread_time() - cpu))
        cache[key] = value
        finished[i] = 1
        done += 1
        if key in sends:
            msg, addrs = sends[key]
            for a in addrs:
                pending.setdefault(a, []).append((msg, value))
        for r in readers_of_key.get(key, ()):
            missing[r] -= 1
            if missing[r] == 0:
                heapq.heappush(ready, r)
        for k in task_slots[i]:
            if k in readers_left:
                readers_left[k] -= 1
                if readers_left[k] == 0 and k not in exports:
                    cache.pop(k, None)
        if key not in readers_left and key not in exports:
            cache.pop(key, None)
        for m in task_msgs[i]:
            msg_readers_left[m] -= 1
            if msg_readers_left[m] == 0:
                received.pop(m, None)
    flush()
    for address, f in outgoing:
        try:
            f.result(timeout=max(1.0, deadline - time.monotonic()))
        except Exception as e:  # the peer is gone, or its comm broke: the driver tells which
            raise PeerExchangeError(f"stage {spec.channel}: a message to {address} failed: {e!r}") from e
    return {k: cache[k] for k in stage.exports}


def _kind(key):
    return key[0] if isinstance(key, tuple) and key else key


def _nbytes(value):
    """Bytes of the arrays in a message's values (dicts, lists and tuples looked into)."""
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return int(getattr(value, "nbytes", 0) or 0)


def record_timeline(on=True, dask_worker=None):
    """Start (``on``) or stop recording the timeline of this worker's peer stages
    (``Client.run`` calls it on every worker; the peer plugin must be registered first,
    :class:`PeerExchange`). Returns whether this worker has the plugin.

    A diagnostic: while it is on, every task a stage runs also reads the thread's CPU
    clock, and every wait, message sent and message read is noted (:func:`take_timeline`);
    a worker keeps the last :data:`TIMELINE_EVENTS` (a default run notes about 70 per
    iteration)."""
    plugin = dask_worker.plugins.get(NAME) if dask_worker is not None else None
    if plugin is None:
        return False
    plugin.timeline = collections.deque(maxlen=TIMELINE_EVENTS) if on else None
    return True


def take_timeline(dask_worker=None):
    """The events recorded on this worker since the last call (recording goes on), as
    tuples, times in seconds of ``time.perf_counter`` (the system's monotonic clock on
    Linux, the same in every process of a machine):

    ``("task", kind, start, end, cpu_s)``
        a task of a stage: ``kind`` its key's first element (``"grad"``, ``"update"`` ...),
        ``cpu_s`` the CPU its thread used;
    ``("wait", channel, start, end)``
        a stage waiting for a message;
    ``("send", channel, start, end, nbytes)``
        a message handed to a peer (the sending thread's time);
    ``("receive", channel, start, end, nbytes)``
        a same-host message read by this worker (from its first byte to the mailbox);
    ``("stage", channel, start, end, n_tasks)``
        a whole stage (a peer block), from its start on its thread to its end.
    """
    plugin = dask_worker.plugins.get(NAME) if dask_worker is not None else None
    if plugin is None or plugin.timeline is None:
        return []
    timeline = plugin.timeline
    # what stages append meanwhile (at the right) stays for the next call
    return [timeline.popleft() for _ in range(len(timeline))]
