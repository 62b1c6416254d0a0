"""The forwarder: the I/O around the sans-IO balancer, on the daemon's asyncio (uvloop) loop.

It owns the NFQUEUE socket and the conntrack event socket, both read from
the event loop without blocking it: on each wake-up every waiting packet is
read, decided in one call, and answered in one sendmsg. Maglev tables are
built, and the conntrack table dumped (least-conn: at start, and after the
event socket overflowed), in worker threads, away from the packet path.
Everything the balancer asks for (verdicts, table builds, wake-ups, logs)
is carried out here and nowhere else.

If this process dies or stalls, nothing breaks: the queue rule carries
--queue-bypass and the queue is fail-open, so new flows take the kernel's
own pick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Mapping, NamedTuple

from ..lb import maglev
from ..lb.balancer import (
    Balancer, BuildTable, FlowEnded, FlowStarted, Log, NodeAddresses, PacketsQueued, ServicesChanged, TableBuilt,
    Tick, Verdict, Verdicts, Wakeup,
)
from ..lb.policy import PortTable
from ..marks import KEEP_MASK
from ..netlink.ctevents import CtEvent, EventSocket, dump_flows
from .nfqueue import QueueSocket

log = logging.getLogger(__name__)

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
                 clock: Callable[[], float] = time.monotonic, batch: int = 1024):
        self.queues = queues
        self.balancer = balancer or Balancer()
        self.clock = clock
        self.batch = batch
        self.latency = LatencyHistogram()
        self.packets = 0
        self.table_builds = 0
        self._socket: QueueSocket | None = None
        self._events: EventSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.TimerHandle | None = None
        self.conntrack_resyncs = 0  # least-conn's flows rebuilt from a dump
        self._resync: _Resync | None = None  # the dump in flight

    async def start(self) -> None:
        """Binds the queues (raises nfqueue.QueueError when it cannot) and starts reading."""
        self._loop = asyncio.get_running_loop()
        self._socket = QueueSocket(self.queues)
        self._loop.add_reader(self._socket.fileno(), self._on_packets)
        self._run(self.balancer.handle(Tick(self.clock())))
        log.info("forwarder reading NFQUEUE %s", ",".join(map(str, self.queues)))

    def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
        for sock in (self._socket, self._events):
            if sock is not None and self._loop is not None:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        self._socket = self._events = None

    # inputs from the daemon

    def services_changed(self, tables: Mapping[object, tuple[PortTable, ...]]) -> None:
        self._run(self.balancer.handle(ServicesChanged(tables, self.clock())))
        if self._events is None and self._loop is not None and any(
                p.table.algorithm == "least-conn" for p in self.balancer.ports.values()):
            self._follow_conntrack()

    def node_addresses(self, ips: tuple[bytes, ...]) -> None:
        self._run(self.balancer.handle(NodeAddresses(ips)))

    def snapshot(self) -> dict:
        """Counts and per-port state for /status and /metrics (plain data: it crosses processes, see workers.py)."""
        balancer, latency = self.balancer, self.latency
        return {
            "packets": self.packets, "undecided": balancer.undecided, "table_builds": self.table_builds,
            "affinity_entries": balancer.affinity_entries(),
            "latency": {"buckets": list(latency.buckets), "counts": list(latency.counts), "total": latency.total,
                        "count": latency.count},
            "services": balancer.status(),
            "per_queue": {str(q): self.packets for q in self.queues} if len(self.queues) == 1 else {},
            "conntrack_overflows": self._events.lost if self._events is not None else 0,
            "conntrack_resyncs": self.conntrack_resyncs,
        }

    # I/O

    def _on_packets(self) -> None:
        started = time.perf_counter()
        packets: list = []
        self._socket.read(packets, self.batch)
        if not packets:
            return
        try:
            commands = self.balancer.handle(PacketsQueued(packets, self.clock()))
        except Exception:  # a bug must not strand packets in the queue: let them all go on, undecided
            log.exception("balancer failed on a batch of %d packets; they take the kernel's pick", len(packets))
            commands = [Verdicts([(p.queue, p.packet_id, p.mark & KEEP_MASK) for p in packets])]
        self._run(commands)
        self.packets += len(packets)
        self.latency.observe(time.perf_counter() - started, len(packets))

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
        self._run(self.balancer.handle(Tick(self.clock())))

    def _build(self, command: BuildTable) -> None:
        if self._loop is None:  # no loop (tests of the wiring): build in place
            table = maglev.build(command.names, command.weights, command.size)
            self._run(self.balancer.handle(TableBuilt(command.port, command.generation, table)))
            return
        future = self._loop.run_in_executor(None, maglev.build, command.names, command.weights, command.size)

        def done(f: asyncio.Future) -> None:
            if f.cancelled():
                return
            if f.exception() is not None:
                log.error("Maglev table for %s failed: %s", command.port, f.exception())
                return
            self.table_builds += 1
            self._run(self.balancer.handle(TableBuilt(command.port, command.generation, f.result())))

        future.add_done_callback(done)


class _LeastConnFrontends(NamedTuple):
    """Where least-conn Services take flows, copied on the loop for a dump thread to filter by."""

    addresses: frozenset  # (packed daddr, protocol, port)
    nodeports: frozenset  # (protocol, port)
    node_ips: frozenset

    @classmethod
    def of(cls, balancer: Balancer) -> _LeastConnFrontends:
        return cls(frozenset(k for k, p in balancer.frontends.items() if p.table.algorithm == "least-conn"),
                   frozenset(k for k, p in balancer.nodeports.items() if p.table.algorithm == "least-conn"),
                   balancer.node_ips)

    def hold(self, event: CtEvent) -> bool:
        flow = event.flow
        return (flow.daddr, flow.protocol, flow.dport) in self.addresses or (
            flow.daddr in self.node_ips and (flow.protocol, flow.dport) in self.nodeports)


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
