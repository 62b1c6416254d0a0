"""One sync: snapshot -> ruleset -> transaction -> kernel, and what went stale.

The kernel is changed only through one atomic transaction per sync; the
remembered state advances only when that transaction succeeded, so a failed
sync leaves both the kernel and our memory of it as they were.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..config import NodeSettings
from ..model import Backend, Protocol, ServicePort, ServiceState, Snapshot
from ..nat import layout, plan
from ..nat.interface import Interface
from ..nat.nftables import NftError
from ..nat.ruleset import Ruleset
from ..nat.render import RulesetBuilder
from ..nat.ruleset import Transaction
from ..netlink.conntrack import StaleFlows
from ..sync.reader import collector_paused


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SyncResult:
    commands: int
    stale: tuple[StaleFlows, ...]
    services: int
    endpoints: int
    seconds: tuple[float, float, float]  # render, plan, apply
    verified: bool = False  # a full resync that found the kernel's rules as the last sync left them: nothing sent


class Proxier:
    """Programs both address families, `ip dataplane` and `ip6 dataplane`, in one transaction."""

    def __init__(self, settings: NodeSettings, nft: Interface, families: tuple[int, ...] = (4, 6)):
        self.nft = nft
        self.builders = [RulesetBuilder(settings, family) for family in families]
        self.programmed = [plan.Programmed() for _ in families]
        self.synced = Snapshot()
        # Userspace mode adds its declarations and elements to each rendered ruleset (daemon/userspace.py).
        self.extend: Callable[[Ruleset, Snapshot], Ruleset] | None = None
        self._synced_ips: tuple[str, ...] | None = None  # the node addresses of the last successful sync
        # The ruleset generation our last commit left, while nothing else has committed since we know of;
        # None when unknown. Any commit in the namespace (anyone's, to any table) moves it on by one.
        self._generation: int | None = None

    def _unchanged(self, snapshot: Snapshot, node_ips: tuple[str, ...]) -> bool:
        """True when `snapshot` and `node_ips` are what the last successful sync programmed."""
        # Userspace mode's additions are its own state's, not only the snapshot's: rendered again.
        return (self.extend is None and node_ips == self._synced_ips and snapshot.follows(self.synced)
                and not snapshot.changed
                and all(state.ruleset is not None for state in self.programmed))

    def sync(self, snapshot: Snapshot, node_ips: tuple[str, ...], full: bool) -> SyncResult:
        """Programs `snapshot`. On failure it raises (NftError from the kernel, or whatever
        render, userspace mode's `extend` or the planner raised) with the kernel and the
        planner's memory of it as they were (the next sync, a full one, starts from there)."""
        started = time.perf_counter()
        # Rendering 10,000 Services allocates 130,000 tuples, and a sync makes no cycles worth collecting:
        # the cyclic collector would walk the heap again and again (render 0.5-0.8 s instead of 0.26 s).
        with collector_paused():
            try:
                return self._sync(snapshot, node_ips, full, started)
            except BaseException:
                self._generation = None  # whatever the kernel holds now, the next full sync rewrites it
                raise

    def _sync(self, snapshot: Snapshot, node_ips: tuple[str, ...], full: bool, started: float) -> SyncResult:
        generation = self.nft.generation()
        unchanged = full and self._unchanged(snapshot, node_ips)
        if unchanged and generation is not None and generation == self._generation:
            # A resync with nothing changed, here or in the kernel: no transaction has been committed
            # in the namespace since ours, so the kernel holds exactly what we last programmed.
            # (Packets' own updates to affinity sets and conntrack are not transactions, and are kept.)
            return self._result(0, (), snapshot, started, started, started, verified=True)
        if unchanged:
            # A resync with nothing changed (issue 14): rendering is pure, so the rulesets the
            # kernel was last given are the ones it would build; reusing them also keeps a
            # second copy of every element out of memory. The transaction is still complete.
            rulesets = [state.ruleset for state in self.programmed]
        else:
            rulesets = [builder.build(snapshot, node_ips) for builder in self.builders]
            if self.extend is not None:
                rulesets = [self.extend(ruleset, snapshot) for ruleset in rulesets]
        rendered = time.perf_counter()
        if full:
            # Flush and refill in place, so that affinity sets keep their clients; should
            # that fail (an object of ours changed shape), replace the tables whole.
            existing = [self.nft.list_objects(r.family, r.table) for r in rulesets]
            attempts = [existing, [None] * len(rulesets)] if None not in existing else [[None] * len(rulesets)]
        else:
            attempts = [None]
        for attempt in attempts:
            tx = Transaction()
            changes = []
            for index, (ruleset, state) in enumerate(zip(rulesets, self.programmed)):
                family_tx, change = plan.full(ruleset, attempt[index]) if full else state.plan(ruleset)
                tx.extend(family_tx.commands)
                changes.append(change)
            planned = time.perf_counter()
            try:
                self.nft.apply(tx)
                break
            except NftError as error:
                if attempt is attempts[-1]:
                    raise
                log.warning("in-place full sync refused (%s); replacing the tables", error)
        applied = time.perf_counter()
        after = self.nft.generation()
        # Ours is the only commit between the two reads when the generation moved on by exactly one
        # (by none: the transaction was empty). A partial sync is a difference from what we last left,
        # so it is known only if that was still there; a full sync writes the whole tables.
        known = generation is not None and (full or generation == self._generation)
        self._generation = after if known and after == (_next_generation(generation) if tx else generation) else None
        self.programmed = [change if full else state.commit(change) for state, change in zip(self.programmed, changes)]
        stale = stale_flows(self.synced, snapshot)
        self.synced = snapshot
        self._synced_ips = node_ips
        return self._result(len(tx), stale, snapshot, started, rendered, planned, applied)

    def _result(self, commands: int, stale: tuple[StaleFlows, ...], snapshot: Snapshot, started: float,
                rendered: float, planned: float, applied: float | None = None, verified: bool = False) -> SyncResult:
        endpoints = sum(count for state in self.programmed for name, count in state.sizes.items()
                        if layout.holds_endpoints(state.ruleset.declarations.get(name)))
        timings = (rendered - started, planned - rendered, (applied or planned) - planned)
        return SyncResult(commands, stale, len(snapshot.services), endpoints, timings, verified)


def _next_generation(generation: int) -> int:
    """The generation after `generation`: a 32-bit counter that skips 0."""
    return generation % 0xFFFFFFFF + 1


def stale_flows(old: Snapshot, new: Snapshot) -> tuple[StaleFlows, ...]:
    """UDP/SCTP flows to delete after moving from `old` to `new` (see StaleFlows)."""
    stale: set[StaleFlows] = set()
    for key in new.changed_since(old):
        before, after = old.services.get(key), new.services.get(key)
        if after is before:
            continue
        # A vanished TCP endpoint answers with a reset: only UDP and SCTP ports leave flows behind. Most
        # Services have none, and a first sync (every Service new) would build a set of every backend.
        ports_before, ports_after = _connectionless(before), _connectionless(after)
        if not ports_before and not ports_after:
            continue
        serving_after = _serving(ports_after)
        for port, backends in ports_before:
            keep = serving_after.get((port.name, port.protocol), set())
            stale |= {StaleFlows(port.protocol.value, b.ip, b.port)
                      for b in backends if b.serving and (b.ip, b.port) not in keep}
        serving_before = _serving(ports_before)
        for port, backends in ports_after:
            if serving_after[(port.name, port.protocol)] and not serving_before.get((port.name, port.protocol)):
                service = after.service
                addresses = service.cluster_ips + service.external_ips_all
                stale |= {StaleFlows(port.protocol.value, ip, port.port, "frontend") for ip in addresses}
                if port.node_port:
                    stale.add(StaleFlows(port.protocol.value, "", port.node_port, "frontend"))
    return tuple(sorted(stale))


def _connectionless(state: ServiceState | None) -> list[tuple[ServicePort, tuple[Backend, ...]]]:
    """The UDP and SCTP ports of `state` (None: a Service that is not there), each with its backends."""
    if state is None:
        return []
    return [(port, backends) for port, backends in state.port_backends() if port.protocol is not _TCP]


def _serving(ports: list[tuple[ServicePort, tuple[Backend, ...]]]) -> dict[tuple[str, Protocol], set[tuple[str, int]]]:
    return {(port.name, port.protocol): {(b.ip, b.port) for b in backends if b.serving} for port, backends in ports}


_TCP = Protocol.TCP
