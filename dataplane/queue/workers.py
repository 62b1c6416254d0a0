"""Userspace mode's forwarders: one process per queue, each pinned to the CPU its packets arrive on.

Placement (`forwarder_cpus`). By default there is one queue per CPU, and the
queue rule fans out by CPU (`--queue-cpu-fanout`: queue = first + CPU % N),
so a packet is queued on the CPU where it arrived, its forwarder is pinned
there, and its verdict reinjects it there: no wake-up crosses CPUs (on a
2-CPU VM a cross-CPU wake-up costs about 30 us, a same-CPU one about 4 us).
Where the kernel refuses fanout, the kernel spreads flows by an address hash
(`--queue-balance`) and the forwarders are not pinned. Under the hash a
client and a Service address always meet in the same worker; under fanout a
client's flows meet the worker of the CPU they arrive on, and each worker
keeps its own ClientIP affinity table: a client's first flow then goes to a
weighted hash of its address, the same in every worker (balancer.py, rule 3).
Maglev is a pure function of the endpoints (every worker builds the same
table) and least-conn workers each follow conntrack's events, which count
every worker's flows.

The daemon keeps the control, off the packet CPUs' loops: `WorkerPool` has
the Forwarder's interface (services_changed, node_addresses, snapshot,
close). Each worker is `python -m dataplane.queue.workers QUEUE ...` with two
socketpairs: control (daemon -> worker: the daemon's whole view, then
changes, and snapshot requests) and report (worker -> daemon: ready, then
snapshots when asked). Messages are length-prefixed pickles between
processes of this same program. Workers report only when asked (/status,
/metrics), so an idle packet CPU does no bookkeeping.

Invariant: the daemon never blocks on a worker for long. Control messages
leave through a sender thread per worker; a snapshot waits at most
SNAPSHOT_WAIT for the answers and uses the last one of a worker that is
late; a worker that dies leaves its queue unbound (new flows fail open to
the kernel's pick) and is started again, with the whole view, a second later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
SNAPSHOT_WAIT = 1.0  # seconds /status and /metrics wait for the workers' answers (busy ones are late)


def default_queue_count() -> int:
    """One queue per CPU the kernel may queue packets on (fanout maps CPU c to queue c % N)."""
    return os.cpu_count() or 1


def forwarder_cpus(count: int, fanout: bool, allowed: frozenset[int], pinned: tuple[int, ...] | None = None,
                   ) -> dict[int, frozenset[int]]:
    """Queue index (0..count-1) -> the CPUs its forwarder may run on; an index not in the result is not pinned.

    `pinned`: CPUs given by hand, queue i on pinned[i % len]; empty: pin none.
    None (the default): under fanout, queue i's forwarder runs on the CPUs
    whose packets go to queue i (c % count == i) that this process may use
    (all of those allowed when none is); without fanout a packet may come from
    any CPU, so no pinning helps and none is done.
    """
    if pinned is not None:
        return {i: frozenset((pinned[i % len(pinned)],)) for i in range(count)} if pinned else {}
    if not fanout:
        return {}
    return {i: frozenset(c for c in allowed if c % count == i) or allowed for i in range(count)}


def frame(message) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class Frames:
    """Reassembles length-prefixed messages from a byte stream (pure)."""

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self.buffer += data
        messages = []
        while len(self.buffer) >= 4:
            (length,) = _LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < 4 + length:
                break
            messages.append(pickle.loads(bytes(self.buffer[4 : 4 + length])))
            del self.buffer[: 4 + length]
        return messages


def merge_snapshots(snapshots: list[dict]) -> dict:
    """One view of several workers: counts add up; least-conn's active flows (each worker counts all) take the max."""
    summed = ("packets", "undecided", "table_builds", "affinity_entries", "conntrack_overflows", "conntrack_resyncs",
              "cpu_seconds", "cpu_user_seconds")
    merged = {**dict.fromkeys(summed, 0), "latency": None, "services": [], "per_queue": {}}
    merged["cpu_seconds"] = merged["cpu_user_seconds"] = 0.0
    ports: dict[str, dict] = {}
    for snap in snapshots:
        for key in summed:
            merged[key] += snap.get(key, 0)
        merged["per_queue"].update(snap.get("per_queue", {}))
        latency = snap["latency"]
        if merged["latency"] is None:
            merged["latency"] = {"buckets": latency["buckets"], "counts": list(latency["counts"]),
                                 "total": latency["total"], "count": latency["count"]}
        else:
            merged["latency"]["counts"] = [a + b for a, b in zip(merged["latency"]["counts"], latency["counts"])]
            merged["latency"]["total"] += latency["total"]
            merged["latency"]["count"] += latency["count"]
        for port in snap["services"]:
            into = ports.get(port["service"])
            if into is None:
                ports[port["service"]] = {**port, "endpoints": [dict(e) for e in port["endpoints"]]}
                continue
            into["affinity_entries"] += port["affinity_entries"]
            by_name = {e["endpoint"]: e for e in into["endpoints"]}
            for endpoint in port["endpoints"]:
                mine = by_name.get(endpoint["endpoint"])
                if mine is None:
                    into["endpoints"].append(dict(endpoint))
                else:
                    mine["decided"] += endpoint["decided"]
                    mine["active"] = max(mine["active"], endpoint["active"])
    merged["services"] = [ports[name] for name in sorted(ports)]
    return merged


class _Worker:
    def __init__(self, queue_number: int, maglev_size: int, cpus: frozenset[int] = frozenset(),
                 busy_poll: float = 0.0, loop: str = "blocking"):
        self.queue = queue_number
        self.loop = loop
        self.affinity_by_hash = False  # set by WorkerPool.place: fanned out, one client may meet several workers
        self.maglev_size = maglev_size
        self.cpus = cpus
        self.busy_poll = busy_poll
        self.ready = False
        self.process: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.report: socket.socket | None = None
        self.outbox: queue.Queue = queue.Queue()
        self.frames = Frames()
        self.snapshot: dict | None = None
        self.sender: threading.Thread | None = None

    def spawn(self) -> None:
        control_here, control_there = socket.socketpair()
        report_here, report_there = socket.socketpair()
        argv = [sys.executable, "-m", "dataplane.queue.workers", str(self.queue), str(control_there.fileno()),
                str(report_there.fileno()), str(self.maglev_size), ",".join(map(str, sorted(self.cpus))) or "-",
                repr(self.busy_poll), self.loop, "hash" if self.affinity_by_hash else "pick"]
        self.process = subprocess.Popen(argv, pass_fds=(control_there.fileno(), report_there.fileno()),
                                        stdin=subprocess.DEVNULL)
        control_there.close()
        report_there.close()
        self.control, self.report, self.frames, self.outbox = control_here, report_here, Frames(), queue.Queue()
        self.sender = threading.Thread(target=self._send, args=(self.control, self.outbox), daemon=True,
                                       name=f"queue-{self.queue}-control")
        self.sender.start()

    @staticmethod
    def _send(sock: socket.socket, outbox: queue.Queue) -> None:
        while (message := outbox.get()) is not None:
            try:
                sock.sendall(frame(message))
            except OSError:
                return

    def send(self, message) -> None:
        self.outbox.put(message)

    def wait_ready(self, timeout: float) -> None:
        """Blocks until the worker bound its queue; raises OSError with its reason otherwise."""
        self.report.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.report.recv(65536)
            if not data:
                raise OSError(f"queue {self.queue}: worker exited (status {self.process.wait()})")
            for message in self.frames.feed(data):
                if message[0] == "ready":
                    self.report.setblocking(False)
                    self.ready = True
                    return
                if message[0] == "error":
                    raise OSError(message[1], f"queue {self.queue}: {message[2]}")
        raise OSError(f"queue {self.queue}: worker not ready within {timeout} s")

    def stop(self) -> None:
        self.ready = False
        self.outbox.put(None)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for sock in (self.control, self.report):
            if sock is not None:
                sock.close()


class WorkerPool:
    """The Forwarder's interface over one worker process per queue."""

    def __init__(self, queues: tuple[int, ...], maglev_size: int = 65537, cpus: dict[int, frozenset[int]] | None = None,
                 busy_poll: float = 0.0, loop: str = "blocking"):
        """`cpus`: queue index -> CPUs of its worker (forwarder_cpus); `busy_poll`: seconds each spins after a batch;
        `loop`: "blocking" (packets read by a thread blocking in recv) or "event" (by the event loop)."""
        self.queues = queues
        self.workers = [_Worker(q, maglev_size, (cpus or {}).get(i, frozenset()), busy_poll, loop)
                        for i, q in enumerate(queues)]
        self._asked = 0
        self.tables: dict = {}
        self.maglev_size = maglev_size
        self.maglev: dict[str, tuple] = {}  # port -> (names, weights, table): built here, sent to every worker
        self._building: dict[str, tuple] = {}  # port -> (names, weights) of the build under way
        self.node_ips: tuple[bytes, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    def place(self, cpus: dict[int, frozenset[int]], fanout: bool = False) -> None:
        """Before start(): queue index -> the CPUs of its worker (forwarder_cpus); an index left out is not pinned.

        `fanout`: queues take packets by CPU, so one client's flows may meet any
        worker; first ClientIP-affinity picks then hash the client (balancer.py, rule 3).
        """
        for i, worker in enumerate(self.workers):
            worker.cpus = cpus.get(i, frozenset())
            worker.affinity_by_hash = fanout and len(self.workers) > 1

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for worker in self.workers:
            await self._start(worker)
        log.info("forwarder: %d worker processes on NFQUEUE %s (%s)", len(self.workers), ",".join(map(str, self.queues)),
                 ", ".join(f"queue {w.queue} on CPU {','.join(map(str, sorted(w.cpus)))}" if w.cpus else
                           f"queue {w.queue} unpinned" for w in self.workers))

    async def _start(self, worker: _Worker) -> None:
        worker.spawn()
        try:
            await asyncio.to_thread(worker.wait_ready, 10.0)
        except OSError:
            worker.stop()
            raise
        worker.send(("nodes", self.node_ips))
        if self.tables:
            worker.send(("services", dict(self.tables)))
        for port, (names, weights, table) in self.maglev.items():
            worker.send(("table", (port, names, weights, self.maglev_size, table)))
        self._loop.add_reader(worker.report.fileno(), self._on_report, worker)

    def _on_report(self, worker: _Worker) -> None:
        try:
            data = worker.report.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(worker.report.fileno())
            if not self._closing:
                log.error("forwarder for queue %d exited (%s); its new flows fail open until it is back",
                          worker.queue, worker.process.poll())
                worker.stop()
                self._loop.call_later(1.0, lambda: asyncio.ensure_future(self._restart(worker)))
            return
        self._take(worker, data)

    @staticmethod
    def _take(worker: _Worker, data: bytes) -> set:
        """Feeds report bytes; returns the tokens of the snapshots they completed."""
        tokens = set()
        for message in worker.frames.feed(data):
            if message[0] == "snapshot":
                tokens.add(message[1])
                worker.snapshot = message[2]
        return tokens

    async def _restart(self, worker: _Worker) -> None:
        if self._closing:
            return
        try:
            await self._start(worker)
            log.info("forwarder for queue %d is back", worker.queue)
        except OSError as error:
            log.error("forwarder for queue %d did not come back: %s; trying again", worker.queue, error)
            self._loop.call_later(5.0, lambda: asyncio.ensure_future(self._restart(worker)))

    def services_changed(self, tables) -> None:
        for key, ports in tables.items():
            if ports:
                self.tables[key] = ports
            else:
                self.tables.pop(key, None)
        for worker in self.workers:
            worker.send(("services", dict(tables)))
        self._build_tables(tables)

    def _build_tables(self, tables) -> None:
        """Maglev tables for the ports that changed, built in a thread of this process (never on a packet CPU's loop)."""
        from ..lb import maglev
        from ..lb.balancer import maglev_inputs

        live = {table.name for ports in self.tables.values() for table in ports if table.algorithm == "maglev"}
        for port in [p for p in self.maglev if p not in live]:
            del self.maglev[port]
        for ports in tables.values():
            for table in ports:
                if table.algorithm != "maglev" or not table.targets:
                    continue
                inputs = maglev_inputs(table)
                have = self.maglev.get(table.name)
                if (have is not None and have[:2] == inputs) or self._building.get(table.name) == inputs:
                    continue
                self._building[table.name] = inputs
                if self._loop is None:
                    self._built(table.name, inputs, maglev.build(*inputs, self.maglev_size))
                    continue
                future = self._loop.run_in_executor(None, maglev.build, *inputs, self.maglev_size)
                future.add_done_callback(lambda f, port=table.name, inputs=inputs: self._on_built(port, inputs, f))

    def _on_built(self, port: str, inputs: tuple, future: asyncio.Future) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            log.error("Maglev table for %s failed: %s", port, future.exception())
            self._building.pop(port, None)
            return
        self._built(port, inputs, future.result())

    def _built(self, port: str, inputs: tuple, table: list[int]) -> None:
        if self._building.get(port) != inputs:
            return  # a newer build is under way
        del self._building[port]
        self.maglev[port] = (*inputs, table)
        for worker in self.workers:
            worker.send(("table", (port, *inputs, self.maglev_size, table)))

    def node_addresses(self, ips: tuple[bytes, ...]) -> None:
        self.node_ips = ips
        for worker in self.workers:
            worker.send(("nodes", ips))

    def snapshot(self) -> dict:
        """Every worker's counts now: each is asked, and answers within SNAPSHOT_WAIT or its last answer counts."""
        self._asked += 1
        token = self._asked
        waiting = [w for w in self.workers if w.ready]
        for worker in waiting:
            worker.send(("snapshot", token))
        deadline = time.monotonic() + SNAPSHOT_WAIT
        while waiting and (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([w.report for w in waiting], [], [], remaining)
            for sock in readable:
                worker = next(w for w in waiting if w.report is sock)
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # gone: _on_report sees the end too, and restarts it
                    waiting.remove(worker)
                elif token in self._take(worker, data):
                    waiting.remove(worker)
        return merge_snapshots([w.snapshot for w in self.workers if w.snapshot is not None])

    def close(self) -> None:
        self._closing = True
        for worker in self.workers:
            if self._loop is not None and worker.report is not None:
                try:
                    self._loop.remove_reader(worker.report.fileno())
                except (ValueError, OSError):
                    pass
            worker.stop()


# -- the worker process -----------------------------------------------------------------------------

async def _serve(forwarder, control: socket.socket, report: socket.socket, packets_here: threading.Event | None,
                 ) -> None:
    """The worker's event loop: control, snapshots, ticks; and packets too unless `packets_here`.

    `packets_here`: set once the queue is bound, for the main thread's blocking reader to take the packets.
    """
    from .nfqueue import QueueError

    try:
        await forwarder.start(read_in_loop=packets_here is None)
    except (QueueError, OSError) as error:
        report.sendall(frame(("error", error.errno or 0, str(error))))
        return
    report.sendall(frame(("ready",)))
    if packets_here is not None:
        packets_here.set()
    # Answers leave through a thread: a daemon slow to read must not stall the packet loop.
    outbox: queue.Queue = queue.Queue()
    threading.Thread(target=_Worker._send, args=(report, outbox), daemon=True, name="report").start()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    frames = Frames()
    control.setblocking(False)

    def on_control() -> None:
        try:
            data = control.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:  # the daemon is gone: so are we (the queue then bypasses to the kernel)
            done.set()
            return
        for kind, payload in frames.feed(data):
            if kind == "services":
                forwarder.services_changed(payload)
            elif kind == "nodes":
                forwarder.node_addresses(payload)
            elif kind == "table":
                forwarder.table_ready(*payload)
            elif kind == "snapshot":
                outbox.put(("snapshot", payload, forwarder.snapshot()))

    loop.add_reader(control.fileno(), on_control)
    if packets_here is None:  # (signals reach the main thread only: there, the blocking reader's)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        outbox.put(None)
        if packets_here is None:
            forwarder.close()


def main(argv: list[str]) -> int:
    import uvloop

    from ..lb.balancer import Balancer
    from .forwarder import Forwarder

    queue_number, control_fd, report_fd, maglev_size = (int(a) for a in argv[:4])
    cpus = frozenset(int(c) for c in argv[4].split(",")) if len(argv) > 4 and argv[4] != "-" else frozenset()
    busy_poll = float(argv[5]) if len(argv) > 5 else 0.0
    blocking = (argv[6] if len(argv) > 6 else "blocking") == "blocking"
    affinity_by_hash = len(argv) > 7 and argv[7] == "hash"
    try:
        # A packet-path process, as ovs-vswitchd is: new flows wait while it waits (Debian runs that at nice -10).
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass
    logging.basicConfig(level=logging.INFO, format=f"queue-{queue_number}: %(levelname)s %(name)s %(message)s")
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)  # before any thread starts: the Maglev builder inherits it
        except OSError as error:
            logging.getLogger(__name__).warning("cannot pin to CPUs %s (%s); running unpinned", sorted(cpus), error)
    control = socket.socket(fileno=control_fd)
    report = socket.socket(fileno=report_fd)
    forwarder = Forwarder((queue_number,), Balancer(maglev_size, affinity_by_hash=affinity_by_hash),
                          busy_poll=busy_poll, tables_from_daemon=True)
    if not blocking:
        uvloop.run(_serve(forwarder, control, report, None))
        return 0
    # The blocking reader: packets in this (the main) thread, everything else on an event loop in another.
    packets_here = threading.Event()

    def control_loop() -> None:
        try:
            uvloop.run(_serve(forwarder, control, report, packets_here))
        finally:  # the daemon is gone, or the queue could not be bound: end
            forwarder.stopping = True
            packets_here.set()

    def stop(*_) -> None:  # at a batch's end, never inside one: a packet read is a packet answered
        forwarder.stopping = True
        packets_here.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=control_loop, daemon=True, name="control").start()
    packets_here.wait()
    if forwarder.bound:
        forwarder.serve_packets()  # answers what is waiting, then unbinds: new flows bypass to the kernel's pick
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
