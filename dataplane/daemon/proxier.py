"""One sync: snapshot -> ruleset -> transaction -> kernel, and what went stale.

The kernel is changed only through one atomic transaction per sync; the
remembered state advances only when that transaction succeeded, so a failed
sync leaves both the kernel and our memory of it as they were.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import NodeSettings
from ..lb.endpoints import usable_endpoints
from ..model import Protocol, Snapshot
from ..nat import plan
from ..nat.nftables import Nftables
from ..nat.render import NODE, RulesetBuilder
from ..netlink.conntrack import StaleFlows


@dataclass(frozen=True, slots=True)
class SyncResult:
    commands: int
    stale: tuple[StaleFlows, ...]
    services: int
    endpoints: int
    seconds: tuple[float, float, float]  # render, plan, apply


class Proxier:
    def __init__(self, settings: NodeSettings, nft: Nftables, family: int = 4):
        self.nft = nft
        self.builder = RulesetBuilder(settings, family)
        self.programmed = plan.Programmed()
        self.synced = Snapshot()

    def sync(self, snapshot: Snapshot, node_ips: tuple[str, ...], full: bool) -> SyncResult:
        """Programs `snapshot`; raises NftError with the kernel untouched on failure."""
        started = time.perf_counter()
        ruleset = self.builder.build(snapshot, node_ips)
        rendered = time.perf_counter()
        if full:
            tx, change = plan.full(ruleset)
        else:
            tx, change = self.programmed.plan(ruleset)
        planned = time.perf_counter()
        self.nft.apply(tx)
        applied = time.perf_counter()
        state = self.programmed = change if full else self.programmed.commit(change)
        stale = stale_flows(self.synced, snapshot)
        self.synced = snapshot
        services = len(ruleset.fragments) - (NODE in ruleset.fragments)
        endpoints = sum(count for name, count in state.sizes.items() if name.startswith("endpoints-"))
        timings = (rendered - started, planned - rendered, applied - planned)
        return SyncResult(len(tx), stale, services, endpoints, timings)


def stale_flows(old: Snapshot, new: Snapshot) -> tuple[StaleFlows, ...]:
    """UDP/SCTP endpoints that stopped being usable for some Service port."""
    stale: set[StaleFlows] = set()
    for key in new.changed_since(old):
        before, after = old.services.get(key), new.services.get(key)
        if before is None or after is before:
            continue
        now_usable = {}
        if after is not None:
            now_usable = {port.name: {(b.ip, b.port) for b in usable_endpoints(backends)}
                          for port, backends in after.port_backends()}
        for port, backends in before.port_backends():
            if port.protocol == Protocol.TCP:
                continue  # TCP endpoints that vanish answer with a reset: no stale state
            keep = now_usable.get(port.name, set())
            for backend in usable_endpoints(backends):
                if (backend.ip, backend.port) not in keep:
                    stale.add(StaleFlows(port.protocol.value, backend.ip, backend.port))
    return tuple(sorted(stale))
