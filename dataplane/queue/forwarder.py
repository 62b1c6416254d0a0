"""The forwarder: the I/O around the sans-IO balancer, on the daemon's asyncio (uvloop) loop.

It owns the NFQUEUE socket and the conntrack event socket, both read from
the event loop without blocking it: on each wake-up every waiting packet is
read, decided in one call, and answered in one sendmsg. Maglev tables are
built in a thread, away from the packet path; in a worker process
(`tables_from_daemon`) they come built from the daemon instead, so that no
build competes with packets for this process's CPU and interpreter. The
conntrack table is dumped (least-conn: at start, and after the event socket
overflowed) in a worker thread too. Everything the balancer asks for
(verdicts, table builds, wake-ups, logs) is carried out here and nowhere else.

If this process dies or stalls, nothing breaks: the queue rule carries
--queue-bypass and the queue is fail-open, so new flows take the kernel's
own pick.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
import time
from typing import Callable, Mapping, NamedTuple

from ..lb import maglev
from ..lb.balancer import (
    Balancer, BuildTable, FlowEnded, FlowStarted, Log, NodeAddresses, ServicesChanged, TableBuilt,
    Tick, Verdict, Verdicts, Wakeup,
)
from ..lb.policy import PortTable
from ..marks import KEEP_MASK
from ..netlink.ctevents import CtEvent, EventSocket, dump_flows
from . import nfqueue, picks
from .nfqueue import QueueSocket

log = logging.getLogger(__name__)

MAX_SPIN = 0.01  # seconds one busy-polling callback may hold the loop
BURST = 10e-6  # a blocking recv this fast found its datagram waiting (one that sleeps takes a wake-up at least)
LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3)


class LatencyHistogram:
    """Cumulative-bucket histogram filled per batch (Prometheus' client locks per observation)."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float, times: int = 1) -> None:
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += times
                break
        else:
            self.counts[-1] += times
        self.total += seconds * times
        self.count += times


class Forwarder:
    def __init__(self, queues: tuple[int, ...], balancer: Balancer | None = None,
                 clock: Callable[[], float] = time.monotonic, batch: int = 1024, busy_poll: float = 0.0,
                 tables_from_daemon: bool = False):
        """`busy_poll`: seconds to keep reading (spinning) after a batch before sleeping again; 0: never spin.

        `tables_from_daemon`: Maglev tables arrive through table_ready() instead of being built here.
        """
        self.queues = queues
        self.tables_from_daemon = tables_from_daemon
        # The balancer is shared with serve_packets()' thread when there is one; uncontended, a lock costs ~0.1 us.
        self._lock = threading.Lock()
        self.stopping = False  # serve_packets() answers what is waiting and returns
        self._read_took = 0.0  # seconds the last read that found packets took
        self._tables: dict[str, tuple] = {}  # port -> (names, weights, size, table), from the daemon
        self._wanted: dict[str, BuildTable] = {}  # port -> the build the balancer waits for
        self.balancer = balancer or Balancer()
        self.clock = clock
        self.batch = batch
        self.busy_poll = busy_poll
        self.latency = LatencyHistogram()
        self.packets = 0
        self.table_builds = 0
        self._socket: QueueSocket | None = None
        self._events: EventSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.TimerHandle | None = None
        self.conntrack_resyncs = 0  # least-conn's flows rebuilt from a dump
        self._resync: _Resync | None = None  # the dump in flight
        # The compiled loop's pick table (picks.py), in a holder it reads after each sleep; None: decide in Python.
        self._picks: list | None = [{}] if nfqueue.compiled is not None else None

    async def start(self, read_in_loop: bool = True) -> None:
        """Binds the queues (raises nfqueue.QueueError when it cannot) and starts reading.

        `read_in_loop` False: packets are left to serve_packets(), run by another thread.
        """
        self._loop = asyncio.get_running_loop()
        self._socket = QueueSocket(self.queues)
        if read_in_loop:
            self._loop.add_reader(self._socket.fileno(), self._on_packets)
        self._run(self._handle(Tick(self.clock())))
        log.info("forwarder reading NFQUEUE %s", ",".join(map(str, self.queues)))

    @property
    def bound(self) -> bool:
        return self._socket is not None

    def close(self) -> None:
        """Answers what is waiting, then unbinds. (The kernel drops the packets a closing queue still holds.)"""
        if self._socket is not None:
            self._decide_waiting()
        if self._tick is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._tick.cancel)
            except RuntimeError:
                pass  # the loop is closed already (the blocking reader closes after it)
        for sock in (self._socket, self._events):
            if sock is not None and self._loop is not None:
                try:
                    self._loop.remove_reader(sock.fileno())
                except (RuntimeError, ValueError):
                    pass  # the loop is closed already (the blocking reader closes after it)
                sock.close()
        self._socket = self._events = None

    # inputs from the daemon

    def services_changed(self, tables: Mapping[object, tuple[PortTable, ...]]) -> None:
        self._run(self._handle(ServicesChanged(tables, self.clock())))
        for port in [p for p in self._tables if p not in self.balancer.ports]:
            del self._tables[port]
        if self._events is None and self._loop is not None and any(
                p.table.algorithm == "least-conn" for p in self.balancer.ports.values()):
            self._follow_conntrack()

    def table_ready(self, port: str, names: tuple[str, ...], weights: tuple[int, ...], size: int,
                    table: list[int]) -> None:
        """A Maglev table the daemon built; used now if the balancer waits for it, else when it asks."""
        self._tables[port] = (names, weights, size, table)
        wanted = self._wanted.get(port)
        if wanted is not None and (wanted.names, wanted.weights, wanted.size) == (names, weights, size):
            del self._wanted[port]
            self.table_builds += 1
            self._run(self._handle(TableBuilt(port, wanted.generation, table)))

    def node_addresses(self, ips: tuple[bytes, ...]) -> None:
        self._run(self._handle(NodeAddresses(ips)))

    def snapshot(self) -> dict:
        """Counts and per-port state for /status and /metrics (plain data: it crosses processes, see workers.py)."""
        with self._lock:
            if self._picks is not None:
                picks.fold(self._picks[0], nfqueue.compiled.drain)
            return self._snapshot()

    def _snapshot(self) -> dict:
        balancer, latency = self.balancer, self.latency
        return {
            "packets": self.packets, "undecided": balancer.undecided, "table_builds": self.table_builds,
            # This process's CPU time, threads included (a worker is one forwarder). System time holds the
            # kernel's work on reinjected packets too: a verdict's sendmsg carries each packet on to its Pod.
            "cpu_seconds": time.process_time(), "cpu_user_seconds": os.times().user,
            "affinity_entries": balancer.affinity_entries(),
            "latency": {"buckets": list(latency.buckets), "counts": list(latency.counts), "total": latency.total,
                        "count": latency.count},
            "services": balancer.status(),
            "per_queue": {str(q): self.packets for q in self.queues} if len(self.queues) == 1 else {},
            "conntrack_overflows": self._events.lost if self._events is not None else 0,
            "conntrack_resyncs": self.conntrack_resyncs,
        }

    # I/O

    def serve_packets(self) -> None:
        """The blocking reader: the packet loop in the calling thread, for good (start(read_in_loop=False) first).

        It sleeps in recv itself, so a packet wakes it with no poll and no
        event loop dispatch in between; the event loop (another thread) keeps
        the rest: control, ticks, conntrack events, table builds.
        """
        self._socket.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200_000))
        while not self.stopping:  # recv gives up every 0.2 s (SO_RCVTIMEO, no poll) to look at this flag
            if self._decide(1, block=True):
                # Look for more only when this datagram was already waiting (a burst): at a low rate the
                # recv that finds the socket empty would run on the packet's own CPU, where the client
                # that the verdict just woke waits for it. The next blocking recv sees any packet anyway.
                if self._read_took < BURST:
                    while self._decide(self.batch) > 0:
                        pass
                self._spin()
        self.close()

    def _on_packets(self) -> None:
        self._decide_waiting()
        self._spin()

    def _spin(self) -> None:
        """Busy polling: keep reading while packets come, up to busy_poll after the last one (and MAX_SPIN in all)."""
        if self.busy_poll:
            perf = time.perf_counter
            started = last = perf()
            while (now := perf()) - last < self.busy_poll and now - started < MAX_SPIN:
                if self._decide_waiting():
                    last = perf()

    def _decide_waiting(self, block: bool = False) -> int:
        """Reads what is waiting, decides it, sends the verdicts; returns how many packets.

        The first datagram is answered before looking for more: at a low rate
        the recv that finds the socket empty then runs after the verdict left,
        not before it. Under load the second read takes a whole batch.
        """
        decided = self._decide(1, block)
        if decided:
            while (more := self._decide(self.batch)) > 0:
                decided += more
        return decided

    def _decide(self, limit: int, block: bool = False) -> int:
        if self._picks is not None:
            return self._decide_compiled(limit, block)
        packets: list = []
        started = time.perf_counter()
        self._socket.read(packets, limit, block)
        if not packets:
            return 0
        self._read_took = time.perf_counter() - started
        started += self._read_took
        with self._lock:
            balancer = self.balancer
            try:
                # handle(PacketsQueued(...)) without the event and command objects: the hot path.
                balancer.now = self.clock()
                verdicts = balancer.decide(packets)
            except Exception:  # a bug must not strand packets in the queue: let them all go on, undecided
                log.exception("balancer failed on a batch of %d packets; they take the kernel's pick", len(packets))
                verdicts = [(p.queue, p.packet_id, p.mark & KEEP_MASK) for p in packets]
            self._socket.send(verdicts)
            self.packets += len(packets)
            self.latency.observe(time.perf_counter() - started, len(packets))
        return len(packets)

    def _decide_compiled(self, limit: int, block: bool) -> int:
        """The compiled loop decides what its pick table knows; the balancer the rest (affinity, least-conn, IPv6)."""
        started = time.perf_counter()
        # Under the lock from the first datagram on: a change or a snapshot (which fold the counts) waits for the batch.
        _, decided, rest, self._read_took = self._socket.serve(self._picks, KEEP_MASK, limit, block, self._lock)
        if not decided and not rest:
            return 0
        if rest:
            with self._lock:
                balancer = self.balancer
                try:
                    balancer.now = self.clock()
                    verdicts = balancer.decide(rest)
                except Exception:  # as in _decide: a bug must not strand packets in the queue
                    log.exception("balancer failed on a batch of %d packets; they take the kernel's pick", len(rest))
                    verdicts = [(p.queue, p.packet_id, p.mark & KEEP_MASK) for p in rest]
                self._socket.send(verdicts)
        count = decided + len(rest)
        self.packets += count
        self.latency.observe(max(0.0, time.perf_counter() - started - self._read_took), count)
        return count

    def _handle(self, event) -> list:
        if self._picks is None or not isinstance(event, (ServicesChanged, NodeAddresses)):
            with self._lock:
                return self.balancer.handle(event)
        with self._lock:
            commands = self.balancer.handle(event)
        # The next pick table is built outside the lock (tens of ms at 10,000 Services), while the loop goes on
        # with the last one: what it reads, only this thread changes (handle() runs here, and only here).
        built = picks.build(self.balancer, self._picks[0])
        with self._lock:
            last, self._picks[0] = self._picks[0], built
            picks.fold(last, nfqueue.compiled.drain)  # by target id: the renumbering handle() did is no matter
        return commands

    def _follow_conntrack(self) -> None:
        try:
            self._events = EventSocket()
        except OSError as error:
            log.warning("least-conn: cannot follow conntrack events (%s); counts stay at decisions", error)
            return
        self._loop.add_reader(self._events.fileno(), self._on_conntrack)
        self._dump_conntrack()  # flows that began before we listened count too: after subscribing

    def _on_conntrack(self) -> None:
        events: list[CtEvent] = []
        lost = self._events.lost
        self._events.read(events)
        handle, counted, resync = self.balancer.handle, self.balancer.flows, self._resync
        # Under the lock: the packet thread's decisions count least-conn's pending flows in the same dicts.
        with self._lock:
            for event in events:
                if event.kind == "new":
                    if event.flow_id not in counted:  # a dump may have counted it first
                        handle(FlowStarted(event.flow_id, event.flow, event.endpoint))
                else:
                    handle(FlowEnded(event.flow_id))
                    if resync is not None:
                        resync.ended.add(event.flow_id)
        if self._events.lost != lost:
            log.warning("least-conn: conntrack events lost (socket overflow, %d so far); recounting from a dump",
                        self._events.lost)
            self._dump_conntrack()

    def _dump_conntrack(self) -> None:
        """Rebuilds least-conn's flows from a conntrack dump, read in a worker thread (seconds for a big table)."""
        if self._resync is not None:  # one at a time: the one in flight may predate the loss, so another follows
            self._resync.again = True
            return
        self._resync = resync = _Resync(set(self.balancer.flows))
        future = self._loop.run_in_executor(None, _least_conn_flows, _LeastConnFrontends.of(self.balancer))

        def done(f: asyncio.Future) -> None:
            self._resync = None
            if f.cancelled() or self._events is None:
                return
            if f.exception() is not None:
                log.warning("least-conn: cannot read the conntrack table (%s); counts may drift", f.exception())
            else:
                with self._lock:
                    events = resync_events(f.result(), resync.known, self.balancer.flows, resync.ended)
                    for event in events:
                        self.balancer.handle(event)
                self.conntrack_resyncs += 1
                log.info("least-conn: recounted from %d conntrack entries", len(f.result()))
            if resync.again:
                self._dump_conntrack()

        future.add_done_callback(done)

    def _run(self, commands: list) -> None:
        for command in commands:
            kind = type(command)
            if kind is Verdicts:
                if command.items:
                    self._socket.send(command.items)
            elif kind is Verdict:
                self._socket.send([tuple(command)])
            elif kind is BuildTable:
                self._build(command)
            elif kind is Wakeup:
                if self._loop is not None:
                    if self._tick is not None:
                        self._tick.cancel()
                    self._tick = self._loop.call_later(command.delay, self._on_tick)
            elif kind is Log:
                log.log(logging.getLevelName(command.level.upper()), "%s", command.message)

    def _on_tick(self) -> None:
        self._tick = None
        self._run(self._handle(Tick(self.clock())))

    def _build(self, command: BuildTable) -> None:
        if self.tables_from_daemon:
            self._wanted[command.port] = command
            have = self._tables.get(command.port)
            if have is not None:
                self.table_ready(command.port, *have)
            return
        if self._loop is None:  # no loop (tests of the wiring): build in place
            table = maglev.build(command.names, command.weights, command.size)
            self._run(self._handle(TableBuilt(command.port, command.generation, table)))
            return
        future = self._loop.run_in_executor(None, maglev.build, command.names, command.weights, command.size)

        def done(f: asyncio.Future) -> None:
            if f.cancelled():
                return
            if f.exception() is not None:
                log.error("Maglev table for %s failed: %s", command.port, f.exception())
                return
            self.table_builds += 1
            self._run(self._handle(TableBuilt(command.port, command.generation, f.result())))

        future.add_done_callback(done)


class _LeastConnFrontends(NamedTuple):
    """Where least-conn Services take flows, copied on the loop for a dump thread to filter by."""

    addresses: frozenset  # (packed daddr, protocol, port)
    nodeports: frozenset  # (family, protocol, port)
    node_ips: frozenset

    @classmethod
    def of(cls, balancer: Balancer) -> _LeastConnFrontends:
        return cls(frozenset(k for k, p in balancer.frontends.items() if p.table.algorithm == "least-conn"),
                   frozenset(k for k, p in balancer.nodeports.items() if p.table.algorithm == "least-conn"),
                   balancer.node_ips)

    def hold(self, event: CtEvent) -> bool:
        flow = event.flow
        return (flow.daddr, flow.protocol, flow.dport) in self.addresses or (
            flow.daddr in self.node_ips and (flow.family, flow.protocol, flow.dport) in self.nodeports)


def _least_conn_flows(frontends: _LeastConnFrontends) -> list[CtEvent]:
    """The dump thread: only the flows least-conn counts go back to the loop (a node may hold a million others)."""
    return [event for event in dump_flows() if frontends.hold(event)]


class _Resync:
    """A conntrack dump in flight: what was counted when it began, and what ended meanwhile."""

    def __init__(self, known: set[int]):
        self.known = known
        self.ended: set[int] = set()
        self.again = False  # events were lost while it ran


def resync_events(dumped: list[CtEvent], known: set[int], counted: Mapping[int, object],
                  ended: set[int]) -> list[FlowStarted | FlowEnded]:
    """What brings least-conn's counts to a dump's word. Pure.

    `known`: flows counted when the dump began; `counted`: those counted now
    (events went on meanwhile); `ended`: flows whose end was seen meanwhile.
    A flow counted before the dump and absent from it has ended; a flow in the
    dump that is not counted, and did not end meanwhile, has started. A flow
    that began during the dump was counted by its event and is left alone.
    """
    present = {event.flow_id for event in dumped}
    found: list[FlowStarted | FlowEnded] = [FlowEnded(flow_id) for flow_id in sorted(known - present)]
    found += [FlowStarted(event.flow_id, event.flow, event.endpoint) for event in dumped
              if event.flow_id not in counted and event.flow_id not in ended]
    return found
