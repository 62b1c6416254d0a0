"""Which endpoints may take a new connection: shared by every proxy mode.

kube-proxy's rules, in order:
- usable: the ready endpoints; when none is ready, those still serving while
  terminating, so a rolling update never drops traffic that could have been
  served. An endpoint that is not serving is never used.
- cluster policy: usable endpoints, narrowed to this node's zone by topology
  hints when every ready endpoint carries hints and one names the zone.
- local policy: the usable endpoints among this node's own (no zone hints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .snapshot import Backend


def usable_endpoints(backends: Iterable[Backend]) -> tuple[Backend, ...]:
    backends = tuple(backends)
    ready = tuple(b for b in backends if b.ready)
    if ready:
        return ready
    return tuple(b for b in backends if b.serving and b.terminating)


def topology_filtered(endpoints: tuple[Backend, ...], backends: Iterable[Backend], zone: str) -> tuple[Backend, ...]:
    """`endpoints` narrowed to `zone` when the hints allow it, else unchanged."""
    if not zone:
        return endpoints
    ready = [b for b in backends if b.ready]
    if not ready or any(not b.zone_hints for b in ready) or not any(zone in b.zone_hints for b in ready):
        return endpoints
    hinted = tuple(b for b in endpoints if zone in b.zone_hints)
    return hinted or endpoints


@dataclass(frozen=True, slots=True)
class Selection:
    """The endpoints for each traffic policy of one Service port, on this node."""

    cluster: tuple[Backend, ...]  # for externalTrafficPolicy/internalTrafficPolicy: Cluster
    local: tuple[Backend, ...]  # for ...: Local (this node's endpoints only)
    any_usable: bool  # False: no endpoint at all, the Service port is refused

    @classmethod
    def of(cls, backends: Iterable[Backend], node_name: str, zone: str = "") -> "Selection":
        backends = tuple(backends)
        usable = usable_endpoints(backends)
        local = usable_endpoints(b for b in backends if b.node_name == node_name) if node_name else ()
        return cls(topology_filtered(usable, backends, zone), local, bool(usable))
