"""The userspace balancer: sans-IO. Events in, commands out; no sockets, no clock, no threads.

    events                                   commands
    PacketsQueued / PacketQueued   ──►       Verdicts / Verdict   (mark naming the endpoint)
    ServicesChanged, NodeAddresses ──►       BuildTable           (Maglev, to run off the packet path)
    TableBuilt                     ──►
    FlowStarted, FlowEnded         ──►       (least-conn counts)
    Tick                           ──►       Wakeup, Log

Rules:
1. Every queued packet gets exactly one verdict, and a verdict never drops:
   a packet we cannot read or place goes on without a decision and takes
   the kernel's own pick (the queue bit is cleared, so it is not counted as
   a fail-open).
2. A decision names only an endpoint of the Service port the packet is
   addressed to, among the usable endpoints (model/selection.py) with a
   positive weight when there is one.
3. ClientIP affinity is checked before the algorithm, per Service port, in
   every algorithm; an entry lives `timeout` seconds after the last new
   flow that used it. With `affinity_by_hash` (several forwarders, each with
   its own table, may see one client: queues fanned out by CPU) a client's
   first flow goes to a weighted hash of its address instead of the
   algorithm's pick, so that every forwarder picks the same endpoint.
4. least-conn counts flows the kernel confirmed (conntrack events), plus,
   for two seconds at most, flows decided but not yet seen there, so a
   burst of new flows does not all land on one endpoint.

Only `forwarder.py` performs the I/O these commands ask for.
"""

from __future__ import annotations

import bisect
import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple

from ..marks import KEEP_MASK, mark_for
from ..packet import Flow, PacketQueued, parse
from . import maglev
from .policy import PortTable, Target, packed

PENDING_FOR = 2.0  # seconds a decided flow counts for least-conn before conntrack confirms it
SLOTS_LIMIT = 4096  # random: weighted pick tables up to this many slots, a binary search beyond
_PORTS = struct.Struct("!HH").pack


# -- events ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PacketsQueued:
    """A batch read in one wake-up; `now` is when it was read (seconds, any monotonic clock)."""

    packets: list
    now: float


@dataclass(frozen=True, slots=True)
class ServicesChanged:
    """New tables for some Services: key -> its port tables (empty: the Service is gone)."""

    tables: Mapping[object, tuple[PortTable, ...]]
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class NodeAddresses:
    ips: tuple[bytes, ...]  # packed


@dataclass(frozen=True, slots=True)
class TableBuilt:
    port: str  # PortTable.name
    generation: int
    table: list[int]


@dataclass(frozen=True, slots=True)
class FlowStarted:
    """A conntrack entry appeared: `flow` its original direction, `endpoint` (packed ip, port) the reply's source."""

    flow_id: int
    flow: Flow
    endpoint: tuple[bytes, int]


@dataclass(frozen=True, slots=True)
class FlowEnded:
    flow_id: int


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


# -- commands -------------------------------------------------------------------------------------

class Verdict(NamedTuple):
    queue: int
    packet_id: int
    mark: int


@dataclass(frozen=True, slots=True)
class Verdicts:
    items: list  # of (queue, packet_id, mark)


@dataclass(frozen=True, slots=True)
class BuildTable:
    port: str
    generation: int
    names: tuple[str, ...]
    weights: tuple[int, ...]
    size: int


@dataclass(frozen=True, slots=True)
class Wakeup:
    delay: float


@dataclass(frozen=True, slots=True)
class Log:
    level: str
    message: str


# -- per Service port -----------------------------------------------------------------------------

def flow_hash(flow: Flow) -> int:
    return zlib.crc32(flow.saddr + flow.daddr + _PORTS(flow.sport, flow.dport), flow.protocol)


@dataclass(slots=True)
class PortState:
    table: PortTable
    targets: tuple[Target, ...]  # those that may take new flows (positive weight, or all when none has)
    marks: list[int]  # mark_for(target.id), aligned with targets
    rng: random.Random
    cumulative: list[int] = field(default_factory=list)  # random: running weight totals
    slots: list[int] = field(default_factory=list)  # random: index i weights[i] times (up to SLOTS_LIMIT slots)
    ids: tuple[int, ...] = ()  # target ids, aligned with targets
    sequence: list[int] = field(default_factory=list)  # round-robin: target indices, weighted and interleaved
    cursor: int = 0
    position: dict = field(default_factory=dict)  # target id -> index into targets
    by_address: dict = field(default_factory=dict)  # (packed ip, port) -> target id, for conntrack's reply tuples
    maglev: list[int] = field(default_factory=list)  # slot -> index into maglev_ids
    maglev_ids: tuple[int, ...] = ()  # the target ids the table was built for
    generation: int = 0
    affinity: dict = field(default_factory=dict)  # client (packed) -> [target id, expires]
    decided: dict = field(default_factory=dict)  # target id -> flows decided
    active: dict = field(default_factory=dict)  # target id -> flows live in conntrack (+ pending)

    @classmethod
    def of(cls, table: PortTable, seed: int | None = None) -> "PortState":
        state = cls(table, (), [], random.Random(seed))
        state.reset(table)
        return state

    def reset(self, table: PortTable) -> None:
        self.table = table
        weighted = tuple(t for t in table.targets if t.weight > 0)
        self.targets = weighted or table.targets
        self.marks = [mark_for(t.id) for t in self.targets]
        self.position = {t.id: i for i, t in enumerate(self.targets)}
        self.by_address = {(packed(t.ip), t.port): t.id for t in self.targets}
        weights = [max(t.weight, 1) for t in self.targets] if weighted else [1] * len(self.targets)
        total, self.cumulative = 0, []
        for weight in weights:
            total += weight
            self.cumulative.append(total)
        self.ids = tuple(t.id for t in self.targets)
        # A weighted draw by one index, not a search (the same pick: slot floor(r*W) lies in its target's range).
        self.slots = [i for i, w in enumerate(weights) for _ in range(w)] if total <= SLOTS_LIMIT else []
        self.sequence = smooth_round_robin(weights)
        self.cursor %= max(len(self.sequence), 1)
        self.affinity = {c: e for c, e in self.affinity.items() if e[0] in self.position}

    def pick(self, flow: Flow) -> int:
        """Index into self.targets chosen by the port's algorithm (targets must not be empty)."""
        algorithm = self.table.algorithm
        if algorithm == "maglev":
            return self._maglev(flow)
        if algorithm == "round-robin":
            index = self.sequence[self.cursor]
            self.cursor = (self.cursor + 1) % len(self.sequence)
            return index
        if algorithm == "least-conn":
            return self._least(flow)
        slots = self.slots
        if slots:
            return slots[int(self.rng.random() * len(slots))]
        return bisect.bisect_right(self.cumulative, self.rng.random() * self.cumulative[-1])

    def by_client(self, client: bytes) -> int:
        """Index into self.targets by a weighted hash of the client's address: the same in every process."""
        digest = zlib.crc32(client)
        slots = self.slots
        if slots:
            return slots[digest % len(slots)]
        return bisect.bisect_right(self.cumulative, digest % self.cumulative[-1])

    def _maglev(self, flow: Flow) -> int:
        digest = flow_hash(flow)
        if self.maglev:
            # The table may predate a change: an endpoint still here keeps its flows.
            index = self.position.get(self.maglev_ids[self.maglev[digest % len(self.maglev)]])
            if index is not None:
                return index
        # No table yet for these targets: still a pure function of the flow.
        return bisect.bisect_right(self.cumulative, digest % self.cumulative[-1])

    def _least(self, flow: Flow) -> int:
        active = self.active
        best, best_load = 0, None
        count = len(self.targets)
        start = flow_hash(flow) % count  # ties go to a flow-dependent endpoint, not always the first
        for step in range(count):
            i = (start + step) % count
            target = self.targets[i]
            load = active.get(target.id, 0) / max(target.weight, 1)
            if best_load is None or load < best_load:
                best, best_load = i, load
        return best


def maglev_inputs(table: PortTable) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The endpoint names and weights a port's Maglev table is built from: the targets that take new flows."""
    weighted = tuple(t for t in table.targets if t.weight > 0)
    targets = weighted or table.targets
    return tuple(t.name for t in targets), tuple(max(t.weight, 1) for t in targets)


def smooth_round_robin(weights: list[int], limit: int = 10000) -> list[int]:
    """nginx's smooth weighted round-robin, unrolled: index i appears weights[i] times, spread out."""
    if not weights:
        return []
    total = sum(weights)
    if total > limit:  # keep the sequence short: scale down, keeping every endpoint
        weights = [max(1, w * limit // total) for w in weights]
        total = sum(weights)
    current = [0] * len(weights)
    sequence = []
    for _ in range(total):
        for i, weight in enumerate(weights):
            current[i] += weight
        best = max(range(len(weights)), key=current.__getitem__)
        current[best] -= total
        sequence.append(best)
    return sequence


# -- the balancer ---------------------------------------------------------------------------------

class Balancer:
    """All Service ports of one node. `handle(event)` returns the commands it leads to."""

    def __init__(self, maglev_size: int = maglev.DEFAULT_SIZE, seed: int | None = None,
                 affinity_by_hash: bool = False):
        self.maglev_size = maglev_size
        self.seed = seed
        self.affinity_by_hash = affinity_by_hash
        self.ports: dict[str, PortState] = {}  # by PortTable.name
        self.by_service: dict[object, tuple[str, ...]] = {}
        self.frontends: dict[tuple[bytes, int, int], PortState] = {}
        # (family, protocol, port): a dual-stack Service has a NodePort table per family, each with its own endpoints
        self.nodeports: dict[tuple[int, int, int], PortState] = {}
        self.node_ips: frozenset[bytes] = frozenset()
        self.flows: dict[int, tuple[PortState, int]] = {}  # conntrack id -> (port, target id)
        self.pending: dict[tuple, tuple[PortState, int, float]] = {}  # 5-tuple -> (port, target id, until)
        self.now = 0.0
        self.undecided = 0  # packets let through without a decision (unreadable, or no Service)

    # events

    def handle(self, event) -> list:
        kind = type(event)
        if kind is PacketsQueued:
            self.now = event.now
            return [Verdicts(self.decide(event.packets))]
        if kind is PacketQueued:
            return [Verdict(*self.decide([event])[0])]
        if kind is ServicesChanged:
            self.now = event.now or self.now
            return self._services_changed(event.tables)
        if kind is NodeAddresses:
            self.node_ips = frozenset(event.ips)
            return []
        if kind is TableBuilt:
            port = self.ports.get(event.port)
            if port is not None and port.generation == event.generation:
                port.maglev = event.table
                port.maglev_ids = tuple(t.id for t in port.targets)
            return []
        if kind is FlowStarted:
            self._flow_started(event)
            return []
        if kind is FlowEnded:
            entry = self.flows.pop(event.flow_id, None)
            if entry is not None:
                port, target_id = entry
                port.active[target_id] = port.active.get(target_id, 1) - 1
            return []
        if kind is Tick:
            self.now = event.now
            return self._tick()
        raise TypeError(f"unknown event {event!r}")

    def decide(self, packets: Iterable[PacketQueued]) -> list[tuple[int, int, int]]:
        """The hot path: one (queue, packet id, mark) verdict per packet, in order."""
        out = []
        append = out.append
        frontends, nodeports, node_ips, now = self.frontends, self.nodeports, self.node_ips, self.now
        by_hash = self.affinity_by_hash
        for queue, packet_id, mark, payload in packets:
            flow = parse(payload)
            port = None
            if flow is not None:
                port = frontends.get((flow.daddr, flow.protocol, flow.dport))
                if port is None and flow.daddr in node_ips:
                    port = nodeports.get((flow.family, flow.protocol, flow.dport))
            if port is None or not port.targets:
                self.undecided += 1
                append((queue, packet_id, mark & KEEP_MASK))
                continue
            table = port.table
            index = None
            timeout = table.affinity_timeout
            if timeout is not None:
                entry = port.affinity.get(flow.saddr)
                if entry is not None and entry[1] > now:
                    index = port.position.get(entry[0])
                    if index is not None:
                        entry[1] = now + timeout
            if index is None:
                if timeout is not None:
                    index = port.by_client(flow.saddr) if by_hash else port.pick(flow)
                    port.affinity[flow.saddr] = [port.ids[index], now + timeout]
                else:
                    index = port.pick(flow)
            target_id = port.ids[index]
            decided = port.decided
            decided[target_id] = decided.get(target_id, 0) + 1
            if table.algorithm == "least-conn":
                key = (flow.saddr, flow.sport, flow.daddr, flow.dport, flow.protocol)
                if key not in self.pending:
                    port.active[target_id] = port.active.get(target_id, 0) + 1
                    self.pending[key] = (port, target_id, now + PENDING_FOR)
            append((queue, packet_id, (mark & KEEP_MASK) | port.marks[index]))
        return out

    def _services_changed(self, tables: Mapping[object, tuple[PortTable, ...]]) -> list:
        commands: list = []
        for service, ports in tables.items():
            names = tuple(p.name for p in ports)
            for name in self.by_service.pop(service, ()):
                if name not in names:
                    self._drop_port(name)
            for table in ports:
                state = self.ports.get(name := table.name)
                if state is None:
                    state = self.ports[name] = PortState.of(table, self.seed)
                    changed = True
                else:
                    self._unindex(state)
                    changed = state.table.targets != table.targets or state.table.algorithm != table.algorithm
                    state.reset(table)
                self._index(state)
                if table.algorithm == "maglev" and state.targets and (changed or not state.maglev):
                    state.generation += 1
                    commands.append(BuildTable(name, state.generation, *maglev_inputs(table), self.maglev_size))
            if ports:
                self.by_service[service] = names
        return commands

    def _index(self, state: PortState) -> None:
        table = state.table
        for address in table.addresses:
            self.frontends[(address, table.protocol, table.port)] = state
        if table.node_port:
            self.nodeports[(table.family, table.protocol, table.node_port)] = state

    def _unindex(self, state: PortState) -> None:
        table = state.table
        for address in table.addresses:
            if self.frontends.get((address, table.protocol, table.port)) is state:
                del self.frontends[(address, table.protocol, table.port)]
        key = (table.family, table.protocol, table.node_port)
        if table.node_port and self.nodeports.get(key) is state:
            del self.nodeports[key]

    def _drop_port(self, name: str) -> None:
        state = self.ports.pop(name, None)
        if state is not None:
            self._unindex(state)

    def _flow_started(self, event: FlowStarted) -> None:
        flow = event.flow
        pending = self.pending.pop((flow.saddr, flow.sport, flow.daddr, flow.dport, flow.protocol), None)
        if pending is not None:  # decided here: already counted
            self.flows[event.flow_id] = (pending[0], pending[1])
            return
        port = self.frontends.get((flow.daddr, flow.protocol, flow.dport))
        if port is None and flow.daddr in self.node_ips:
            port = self.nodeports.get((flow.family, flow.protocol, flow.dport))
        if port is None or port.table.algorithm != "least-conn":
            return
        target_id = port.by_address.get(event.endpoint)
        if target_id is not None:
            port.active[target_id] = port.active.get(target_id, 0) + 1
            self.flows[event.flow_id] = (port, target_id)

    def _tick(self) -> list:
        now = self.now
        for key in [k for k, (_, _, until) in self.pending.items() if until <= now]:
            port, target_id, _ = self.pending.pop(key)
            port.active[target_id] = port.active.get(target_id, 1) - 1
        for port in self.ports.values():
            if port.affinity:
                for client in [c for c, (_, expires) in port.affinity.items() if expires <= now]:
                    del port.affinity[client]
        return [Wakeup(1.0)]

    # observations

    def affinity_entries(self) -> int:
        return sum(len(p.affinity) for p in self.ports.values())

    def status(self) -> list[dict]:
        """Per Service port: algorithm, and each endpoint with its weight, active and decided flows."""
        out = []
        for name in sorted(self.ports):
            port = self.ports[name]
            out.append({
                "service": name,
                "algorithm": port.table.algorithm,
                "affinity_timeout": port.table.affinity_timeout,
                "affinity_entries": len(port.affinity),
                "maglev_table": len(port.maglev) if port.table.algorithm == "maglev" else None,
                "endpoints": [{"endpoint": t.name, "id": t.id, "weight": t.weight,
                               "active": port.active.get(t.id, 0), "decided": port.decided.get(t.id, 0)}
                              for t in port.table.targets],
            })
        return out

